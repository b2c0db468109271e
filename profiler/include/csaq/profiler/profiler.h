// Stage 1: salience and co-activation statistics of every decoder Linear on this rank.
//
// Fed by the pipeline (gradient callback + Linear observer), it accumulates in float32:
//   causal      Σ_micro-batches |dL/dW ⊙ W|   (the default)
//   fisher      Σ_micro-batches (dL/dW)²
//   activation  |W_ij| · mean_t |x_tj|        (the AWQ proxy; from Σ_t |x_tj| in float64)
//   magnitude   |W|
// all from the same pass, plus a CoActivation tracker per Linear. Statistics live with the
// layers (sharded); nothing here holds another rank's layers. Not thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "csaq/profiler/coactivation.h"
#include "csaq/shard/comm.h"
#include "csaq/shard/model.h"
#include "csaq/shard/pipeline.h"

namespace csaq {
namespace storage {
class H5File;
}

enum class SalienceKind { kCausal, kFisher, kActivation, kMagnitude };
SalienceKind parse_salience_kind(const std::string& name);  // throws listing the kinds
const char* salience_kind_name(SalienceKind kind);

struct ProfilerOptions {
  SalienceKind kind = SalienceKind::kCausal;  // ranks clique leaders; tracked by early stopping
  std::int64_t candidates = 512;              // K: co-activation channels tracked per Linear
  double fire_fraction = 0.10;
  // Early stopping: every `check_every` sequences, once `min_sequences` are done, the
  // Spearman correlation between the current and the previous salience on a fixed sample of
  // weights (`sample_per_linear` per Linear, drawn from `seed`); stop when >= `rho`.
  bool early_stop = true;
  std::int64_t check_every = 8;
  std::int64_t min_sequences = 16;
  double rho = 0.98;
  std::int64_t sample_per_linear = 256;
  std::uint64_t seed = 1234;
};

struct EarlyStopCheck {
  std::int64_t sequences = 0;
  double rho = 0.0;
};

// Accumulated statistics of one decoder Linear.
struct LinearStats {
  std::int64_t layer = 0;
  int linear = 0;
  at::Tensor causal;          // [out, in] float32
  at::Tensor fisher;          // [out, in] float32
  at::Tensor input_abs_sum;   // [in] float64
  std::int64_t tokens = 0;    // tokens seen by the observer
  std::int64_t micro_batches = 0;
  CoActivation coact;
};

class Profiler {
 public:
  Profiler(const ModelShard& model, Communicator& comm, ProfilerOptions options);

  const ProfilerOptions& options() const { return options_; }
  GradientCallback gradient_callback();
  const LinearObserver& observer() const { return observer_; }
  // The pipeline's round callback: early stopping, decided identically on every rank.
  RoundCallback round_callback();

  std::vector<LinearStats>& stats() { return stats_; }
  const std::vector<LinearStats>& stats() const { return stats_; }
  const LinearStats& stats(std::int64_t layer, int linear) const;
  const Linear& weights(std::int64_t layer, int linear) const;
  // [out, in] float32 salience of `kind` for one Linear.
  at::Tensor salience(std::int64_t layer, int linear, SalienceKind kind) const;
  // Rows [begin, end) of it (causal and fisher: a view of the accumulator, no copy).
  at::Tensor salience_rows(std::int64_t layer, int linear, SalienceKind kind, std::int64_t begin,
                           std::int64_t end) const;
  // Its values at flat indices `flat` (int64 into [out*in]), computed only there.
  at::Tensor salience_at(std::int64_t layer, int linear, SalienceKind kind, const at::Tensor& flat) const;
  // Cliques of one Linear (see find_cliques), leaders ranked by the options' salience.
  at::Tensor row_leaders(std::int64_t layer, int linear, double clique_threshold) const;

  const std::vector<EarlyStopCheck>& early_stop_checks() const { return checks_; }
  bool stopped_early() const { return stopped_early_; }

  // Collective: writes every Linear's accumulators under "stats/<layer>/<linear>/" (each rank
  // its own layers) plus "profile.json" (options, early stopping, `extra` from rank 0) and the
  // early-stop sample, so that load() resumes exactly where this stopped.
  void save(storage::H5File& file, Communicator& comm, const std::string& extra_json) const;
  // Reads this rank's Linears back; the file's options must match this profiler's.
  void load(const storage::H5File& file);

 private:
  at::Tensor global_sample(SalienceKind kind) const;

  const ModelShard& model_;
  Communicator& comm_;
  ProfilerOptions options_;
  std::vector<LinearStats> stats_;
  std::vector<at::Tensor> sample_index_;  // per local Linear: flat indices into [out*in]
  LinearObserver observer_;
  at::Tensor previous_sample_;
  std::int64_t last_check_ = 0;
  std::vector<EarlyStopCheck> checks_;
  bool stopped_early_ = false;
};

// Collective: the fraction of the top `fraction` of all decoder weights by salience `a`
// that are also in the top `fraction` by salience `b` ("top": strictly above the value ranked
// just past the fraction, so ties never overfill it). Thresholds are exact, from all-reduced
// histograms, so every world size agrees; salience is visited in blocks of at most `chunk`
// weights, so memory beyond the accumulators stays one block's.
double top_fraction_agreement(const Profiler& profiler, SalienceKind a, SalienceKind b, double fraction,
                              Communicator& comm, std::int64_t chunk = std::int64_t{1} << 24);

// Spearman rank correlation of two equally long 1-D tensors (ties ranked by index).
double spearman(const at::Tensor& a, const at::Tensor& b);

}  // namespace csaq
