// Calibration and evaluation text as fixed-length token sequences.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace csaq {

// A token stream cut into non-overlapping sequences of seq_len tokens; the remainder that
// does not fill a sequence is dropped. Every rank holds the same (small) stream, so that
// the first rank can embed and the last rank can score any micro-batch.
class TokenSequences {
 public:
  // `tokens`: 1-D integer tensor; `source` names it in messages. `max_sequences` < 0: all.
  TokenSequences(at::Tensor tokens, std::int64_t seq_len, std::int64_t max_sequences,
                 std::string source);
  // Reads a 1-D .npy token file (see storage/npy.h).
  static TokenSequences from_npy(const std::string& path, std::int64_t seq_len,
                                 std::int64_t max_sequences = -1);

  std::int64_t size() const { return count_; }
  std::int64_t seq_len() const { return seq_len_; }
  std::int64_t tokens() const { return count_ * seq_len_; }
  const std::string& source() const { return source_; }
  // Sequences [first, first + count) as an int64 tensor [count, seq_len].
  at::Tensor batch(std::int64_t first, std::int64_t count) const;
  // Throws naming the source and position when a token id is outside [0, vocab_size).
  void check_vocabulary(std::int64_t vocab_size) const;

 private:
  at::Tensor tokens_;  // int64, exactly count_ * seq_len_ tokens
  std::int64_t seq_len_;
  std::int64_t count_;
  std::string source_;
};

}  // namespace csaq
