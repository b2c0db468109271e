// Co-activation of a Linear's output channels and the cliques built from it.
//
// Channel i "fires" on token t when |y_ti| is among the top `fire_fraction` of |y_t.|.
// Only K candidate channels are tracked (chosen on the first micro-batch as the K with the
// largest mean |y|; index order breaks ties), in a K x K matrix of intersection counts
// |F_i ∩ F_j| (diagonal: |F_i|), so memory is K*K*8 bytes whatever the number of tokens.
// Each micro-batch's firing pattern is packed as one bit vector per candidate (a bit per
// token) whose pairwise AND + popcount is added to the counters and then dropped (on an
// accelerator: a 0/1 matrix times itself). Not thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace csaq {

class CoActivation {
 public:
  CoActivation(std::int64_t channels, std::int64_t max_candidates, double fire_fraction);

  // y: [..., channels], any float dtype; each leading index is a token.
  void observe(const at::Tensor& y);

  std::int64_t channels() const { return channels_; }
  bool started() const { return candidates_.defined(); }
  const at::Tensor& candidates() const { return candidates_; }  // [K] int64, ascending
  const at::Tensor& counts() const { return counts_; }          // [K, K] int64
  std::int64_t tokens() const { return tokens_; }
  // |F_i ∩ F_j| / |F_i ∪ F_j| over the candidates, [K, K] float64; 0 where neither fired.
  at::Tensor jaccard() const;
  std::size_t state_bytes() const;
  // Restores state saved from candidates(), counts() and tokens().
  void restore(at::Tensor candidates, at::Tensor counts, std::int64_t tokens);

 private:
  std::int64_t channels_;
  std::int64_t max_candidates_;
  double fire_fraction_;
  at::Tensor candidates_;
  at::Tensor counts_;
  std::int64_t tokens_ = 0;
};

// Cliques of one Linear's rows. Candidates are visited in descending `row_salience` (index
// order breaks ties); an unassigned one becomes a leader and takes every unassigned
// candidate whose Jaccard similarity to it is >= threshold. Channels outside the candidates
// are cliques of one. Returns leader[row] (int64 [channels]); a leader is its own leader.
at::Tensor find_cliques(const CoActivation& coact, const at::Tensor& row_salience, double threshold);

}  // namespace csaq
