// Micro-batches streamed through the layer shards of all ranks.
//
// Forward: rank r receives hidden states from r-1 (the first rank embeds), runs its layers
// and sends to r+1; the last rank scores the next-token loss. Backward (calibrate): the
// gradient of the hidden states flows back r+1 -> r. Up to `in_flight` micro-batches are
// forwarded before their backward passes run, in the same order (a GPipe schedule), so ranks
// work concurrently. Weight gradients are computed one layer at a time, handed to the
// callback and freed: a rank never holds more than one layer's weight gradients.
// Deterministic: the same data and micro_batch_size give identical results for every world
// size and every in_flight (callbacks see micro-batches in ascending order; the round
// callback runs at the end of every round, and rounds always end at multiples of `align`).
// With `recompute`, a micro-batch keeps only each layer's input between its forward and
// backward pass, and each layer's forward runs again inside the backward pass (activation
// checkpointing): the saved activations of one layer at a time instead of all layers' of all
// micro-batches in flight, for one more forward pass of compute. Results are identical.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <functional>

#include "csaq/shard/progress.h"
#include "csaq/shard/comm.h"
#include "csaq/shard/data.h"
#include "csaq/shard/model.h"

namespace csaq {

// The labels of the loss the backward pass differentiates: the text's next tokens (its
// cross-entropy: the calibration loss), or tokens drawn from the model's own predictive
// distribution at each position (sample_next_tokens; micro-batch m draws with a seed made
// from label_seed and m, so resumed and re-run passes draw the same). The reported loss
// totals are always the text's.
enum class Labels { kText, kSampled };

struct PipelineOptions {
  std::int64_t micro_batch_size = 1;  // sequences per micro-batch
  std::int64_t in_flight = 4;         // micro-batches forwarded before their backward passes
  bool backward = true;               // false: calibrate runs forward passes only (no gradients)
  std::int64_t align = 0;             // > 0: no round crosses a multiple of this many micro-batches
  bool recompute = false;             // keep layer inputs only; re-run each layer's forward in backward
  Labels labels = Labels::kText;      // what the backward pass's loss scores (see Labels)
  std::uint64_t label_seed = 0;
};

struct LossTotals {
  double nll_sum = 0.0;  // summed next-token cross-entropy (nats)
  std::int64_t predicted_tokens = 0;
  std::int64_t sequences = 0;
  double mean_nll() const { return predicted_tokens > 0 ? nll_sum / predicted_tokens : 0.0; }
};

// Where a resumed calibration picks up: the first micro-batch to run (any round's end) and
// the totals before it.
struct ResumePoint {
  std::int64_t micro_batch = 0;
  LossTotals totals;
};

// dLoss/dW of one decoder layer's Linear weights (kLinearNames order) for one micro-batch,
// where Loss is that micro-batch's mean next-token cross-entropy against PipelineOptions'
// labels.
struct LayerGradients {
  std::int64_t micro_batch = 0;
  const DecoderLayer* layer = nullptr;
  std::array<at::Tensor, kNumLinears> weight_grads;
};

using GradientCallback = std::function<void(const LayerGradients&)>;
// Last rank only: float32 logits [b, L, vocab] of a micro-batch and its token ids [b, L].
using LogitsCallback =
    std::function<void(std::int64_t micro_batch, const at::Tensor& ids, const at::Tensor& logits)>;
// What a round callback learns after each round of `in_flight` micro-batches.
struct RoundInfo {
  std::int64_t sequences_done = 0;
  std::int64_t micro_batches_done = 0;
  std::int64_t micro_batches_total = 0;
  LossTotals totals;  // running totals so far; meaningful on the last rank only
};
// Every rank, after each round; returning true stops calibration there. It may run
// collectives, and every rank must return the same answer (early stopping and preemption
// decide this way).
using RoundCallback = std::function<bool(const RoundInfo& info)>;

// Not thread-safe; one per rank, all ranks calling the same methods in the same order.
class Pipeline {
 public:
  Pipeline(const ModelShard& model, Communicator& comm, PipelineOptions options);

  std::int64_t micro_batches(const TokenSequences& data) const;

  // Forward only. Returns the loss totals on every rank. `on_progress` (every rank) hears of
  // each micro-batch finished: its forward here, its backward in calibrate.
  LossTotals evaluate(const TokenSequences& data, const LogitsCallback& on_logits = {},
                      const ProgressCallback& on_progress = {});

  // Forward and backward of every micro-batch from `resume` on; `on_grads` sees each layer's
  // weight gradients, `observer` (if any) every Linear's input and output once per
  // micro-batch (detach before keeping). With options.backward false, forward passes only:
  // on_grads is never called and the observer's tensors carry no graph. With
  // options.recompute, the observer's outputs carry no graph either; `replay` (if any) sees
  // every Linear of the forward pass re-run in the backward pass, whose outputs do (to hook
  // their gradients). Returns the totals of all micro-batches, those before `resume`
  // included, summed in the same order as an uninterrupted run.
  LossTotals calibrate(const TokenSequences& data, const GradientCallback& on_grads,
                       const LinearObserver* observer = nullptr,
                       const LogitsCallback& on_logits = {},
                       const ProgressCallback& on_progress = {},
                       const RoundCallback& after_round = {},
                       const ResumePoint& resume = {},
                       const LinearObserver* replay = nullptr);

 private:
  at::Tensor receive_hidden(std::int64_t batch, std::int64_t seq_len, std::int64_t micro_batch);
  void share_totals(LossTotals& totals);

  const ModelShard& model_;
  Communicator& comm_;
  PipelineOptions options_;
};

}  // namespace csaq
