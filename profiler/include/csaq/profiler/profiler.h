// Stage 1: salience and co-activation statistics of every decoder Linear on this rank, and
// the cost models built on them.
//
// Fed by the pipeline (gradient callback + Linear observer), one pass accumulates, per
// Linear (M micro-batches, L_m the mean loss of micro-batch m, y = x Wᵀ its output):
//   grad_sum     Σ_m dL_m/dW                  [out, in] float32   (kept if the options say so,
//   causal       Σ_m |dL_m/dW ⊙ W|            [out, in] float32    else undefined: see
//   fisher       Σ_m (dL_m/dW)²               [out, in] float32    ProfilerOptions::keep_for)
//   out_grad_sq  Σ_m Σ_t (dL_m/dy_t)²         [out] float64 (output-gradient energy)
//   causal_rows  Σ_m Σ_in |dL_m/dW ⊙ W|       [out] float64 (the causal salience of each row:
//                                                           clique leaders)
//   input_abs_sum Σ_t |x_t|                   [in] float64
// and per distinct Linear input of a layer (q/k/v, o, gate/up, down) H = Σ_t x_t x_tᵀ,
// [in, in] float32 (GPTQ's Hessian, kept as one triangle), plus a CoActivation tracker per Linear. Statistics live
// with the layers (sharded); nothing here holds another rank's layers. Not thread-safe.
//
// A cost model predicts the loss increase of changing a Linear row by Δ (its quantization
// error), summed over the row:
//   taylor      ḡ·Δ + ½ ΔᵀGΔ, ḡ = grad_sum / M and G ≈ out_grad_sq_r · H / M² (the
//               Kronecker-factored Gauss-Newton block of row r): second-order Taylor (default)
//   hessian     the second-order term alone
//   pqi         the post-quantization integral ∫₀¹ ∇L(W + tΔ)·Δ dt, from extra gradient
//               passes with every Linear moved along its Δ (add_pqi)
//   causal      Σ causal/|w| · |Δ|            (first-order salience, the original method)
//   fisher      ½ Σ fisher · Δ²
//   activation  Σ mean_t|x| · |Δ|             (the AWQ proxy)
//   magnitude   Σ |Δ|
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "csaq/profiler/coactivation.h"
#include "csaq/profiler/gram.h"
#include "csaq/shard/comm.h"
#include "csaq/shard/model.h"
#include "csaq/shard/pipeline.h"

namespace csaq {
namespace storage {
class H5File;
}

enum class SalienceKind { kTaylor, kHessian, kPqi, kCausal, kFisher, kActivation, kMagnitude };
SalienceKind parse_salience_kind(const std::string& name);  // throws listing the kinds
const char* salience_kind_name(SalienceKind kind);
// causal, fisher, activation and magnitude have a value per weight (salience(), agreement).
bool is_per_weight(SalienceKind kind);

// The distinct inputs of a decoder layer's Linears: q/k/v read one, o one, gate/up one,
// down one. input_of(linear) is the index of a Linear's input, first_reader(input) the
// Linear that observes it.
inline constexpr int kNumInputs = 4;
int input_of(int linear);

struct ProfilerOptions {
  // The cost model; its per-weight signal (causal for the non-per-weight kinds) ranks clique
  // leaders, and early stopping tracks the statistic it depends on most (the mean gradient
  // for taylor and pqi, the output-gradient energy for hessian).
  SalienceKind kind = SalienceKind::kTaylor;
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
  // The input Hessians (GPTQ and the second-order cost models need them; round-to-nearest
  // does not) and the co-activation counters (only the mixed-format solver's cliques use them).
  bool hessians = true;
  bool coactivation = true;
  // Per-weight accumulators to keep (4 bytes per weight each); see keep_for.
  bool keep_grad_sum = true;
  bool keep_causal = true;
  bool keep_fisher = true;
  // Keeps only what cost model `kind` needs: grad_sum for taylor and pqi (the mean gradient
  // and their early stopping), fisher for fisher, causal for causal; hessian needs none (its
  // early stopping tracks the output-gradient energy). Clique leaders need only the causal
  // row sums, always kept.
  void keep_for(SalienceKind cost, bool gradients);
};

struct EarlyStopCheck {
  std::int64_t sequences = 0;
  double rho = 0.0;
};

// Accumulated statistics of one decoder Linear.
struct LinearStats {
  std::int64_t layer = 0;
  int linear = 0;
  at::Tensor grad_sum;        // [out, in] float32
  at::Tensor causal;          // [out, in] float32
  at::Tensor fisher;          // [out, in] float32
  at::Tensor out_grad_sq;     // [out] float64
  at::Tensor causal_rows;     // [out] float64: Σ_m Σ_in |dL_m/dW ⊙ W|, the causal salience of each row
  at::Tensor input_abs_sum;   // [in] float64
  at::Tensor pqi;             // [formats, out] float64 once add_pqi has run; else undefined
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
  // The pipeline's replay observer (PipelineOptions::recompute): output gradients only.
  const LinearObserver& replay_observer() const { return replay_observer_; }
  // The pipeline's round callback: early stopping, decided identically on every rank.
  RoundCallback round_callback();

  // H of layer `layer`'s input `input` (see input_of), [in, in] float32, and of a Linear's.
  // Kept as one triangle (GramMatrix); the whole matrix is made on request, and the last one
  // made is kept until another is asked for (q, k and v share theirs), so hold the result
  // only while working on its Linears.
  at::Tensor hessian(std::int64_t layer, int input) const;
  at::Tensor linear_hessian(std::int64_t layer, int linear) const { return hessian(layer, input_of(linear)); }
  std::int64_t hessian_tokens(std::int64_t layer, int input) const;

  // Predicted loss increase per row [out] (float64) of changing the Linear by `delta` [out, in]
  // under `kind` (see above); for pqi, `format` indexes the formats add_pqi was given.
  at::Tensor row_cost(std::int64_t layer, int linear, SalienceKind kind, const at::Tensor& delta,
                      std::size_t format) const;

  // The post-quantization integral of every row for `formats` formats: for each format f,
  // every Linear of every rank is moved to W + t·Δ_f (Δ_f = delta_of(layer, linear, f), asked
  // for while the weights are W), `data` runs forward and backward at the Gauss-Legendre
  // points t of [0, 1] (`points` = 1, 2 or 3), and pqi[f] of each row accumulates
  // ∫₀¹ ∇L(W + tΔ)·Δ dt restricted to the row, L the mean micro-batch loss. The weights are W
  // again afterwards. Collective; `model` is the one this profiler observes.
  using DeltaOf = std::function<at::Tensor(std::int64_t layer, int linear, std::size_t format)>;
  void integrate_pqi(ModelShard& model, const TokenSequences& data, const PipelineOptions& options,
                     std::size_t formats, int points, const DeltaOf& delta_of, const ProgressCallback& progress = {});
  bool has_pqi() const { return !stats_.empty() && stats_.front().pqi.defined(); }
  // Whether the statistics cost model `kind` needs were accumulated (or loaded).
  bool has_statistics_for(SalienceKind kind) const;

  std::vector<LinearStats>& stats() { return stats_; }
  const std::vector<LinearStats>& stats() const { return stats_; }
  const LinearStats& stats(std::int64_t layer, int linear) const;
  const Linear& weights(std::int64_t layer, int linear) const;
  // [out, in] float32 salience of a per-weight `kind` for one Linear.
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
  at::Tensor global_sample() const;
  std::size_t index(std::int64_t layer, int linear) const;
  std::size_t hessian_index(std::int64_t layer, int input) const;  // into hessian_ and hessian_tokens_

  const ModelShard& model_;
  Communicator& comm_;
  ProfilerOptions options_;
  std::vector<LinearStats> stats_;
  std::vector<at::Tensor> sample_index_;  // per local Linear: flat indices into [out*in]
  // Per local layer and input: Σ x xᵀ, one triangle; the whole of the last one asked for.
  static constexpr std::size_t kNoHessian = static_cast<std::size_t>(-1);
  std::vector<GramMatrix> hessian_;
  mutable at::Tensor full_;
  mutable std::size_t full_index_ = kNoHessian;
  std::vector<std::int64_t> hessian_tokens_;
  LinearObserver observer_;
  LinearObserver replay_observer_;
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
