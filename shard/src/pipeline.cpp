#include "csaq/shard/pipeline.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <vector>

#include "csaq/shard/phases.h"
#include "csaq/storage/error.h"

namespace csaq {
namespace {

// Messages between a pair of ranks arrive in order; tags only guard against a schedule bug.
// MPI guarantees tags up to 32767.
int tag(std::int64_t micro_batch, int direction) {
  return static_cast<int>((micro_batch % 16000) * 2 + direction);
}
constexpr int kForward = 0;
constexpr int kBackward = 1;

// The seed of micro-batch m's drawn labels: splitmix64 of the pair, so that neighbouring
// micro-batches and seeds draw unrelated streams.
std::uint64_t label_seed(std::uint64_t seed, std::int64_t micro_batch) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (static_cast<std::uint64_t>(micro_batch) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// What one micro-batch keeps between its forward and backward pass on this rank.
struct InFlight {
  at::Tensor ids;
  std::vector<at::Tensor> inputs;   // per local layer: its input (a leaf, or the embedding)
  std::vector<at::Tensor> outputs;  // per local layer: its output, holding the layer's graph
                                    // (none with recompute: made again in the backward pass)
  at::Tensor head_input;            // last rank
  at::Tensor loss;                  // last rank: mean next-token loss of the micro-batch
};

// The last rank stops the run (all ranks end with it) where the loss stops being a number.
void check_finite_loss(double nll, std::int64_t micro_batch, std::int64_t first, std::int64_t count,
                       const TokenSequences& data) {
  CSAQ_CHECK(std::isfinite(nll), "the loss of micro-batch ", micro_batch, " (sequences ", first, " to ",
             first + count - 1, " of ", data.source(), ") is ", nll,
             ": the model's activations overflow or hold NaN (try --dtype float32)");
}

}  // namespace

Pipeline::Pipeline(const ModelShard& model, Communicator& comm, PipelineOptions options)
    : model_(model), comm_(comm), options_(options) {
  CSAQ_CHECK(options_.micro_batch_size >= 1, "micro-batch size must be at least 1");
  CSAQ_CHECK(options_.in_flight >= 1, "micro-batches in flight must be at least 1");
  CSAQ_CHECK(comm_.size() == model_.world_size() && comm_.rank() == model_.rank(),
             "model shard is for rank ", model_.rank(), " of ", model_.world_size(),
             " but the communicator is rank ", comm_.rank(), " of ", comm_.size());
}

std::int64_t Pipeline::micro_batches(const TokenSequences& data) const {
  return (data.size() + options_.micro_batch_size - 1) / options_.micro_batch_size;
}

at::Tensor Pipeline::receive_hidden(std::int64_t batch, std::int64_t seq_len, std::int64_t micro_batch) {
  at::Tensor x = at::empty({batch, seq_len, model_.config().hidden_size}, at::TensorOptions().dtype(model_.dtype()));
  ScopedPhase phase("communication");
  comm_.recv(x, model_.rank() - 1, tag(micro_batch, kForward));
  return x;
}

void Pipeline::share_totals(LossTotals& totals) {
  ScopedPhase phase("communication");
  at::Tensor t = at::tensor({totals.nll_sum, static_cast<double>(totals.predicted_tokens),
                             static_cast<double>(totals.sequences)},
                            at::kDouble);
  comm_.broadcast(t, comm_.size() - 1);
  totals.nll_sum = t[0].item<double>();
  totals.predicted_tokens = static_cast<std::int64_t>(t[1].item<double>());
  totals.sequences = static_cast<std::int64_t>(t[2].item<double>());
}

LossTotals Pipeline::evaluate(const TokenSequences& data, const LogitsCallback& on_logits,
                              const ProgressCallback& on_progress) {
  at::NoGradGuard no_grad;
  const std::int64_t len = data.seq_len(), total = micro_batches(data);
  const PositionTables pos = position_tables(model_.config(), len, model_.dtype());
  LossTotals totals;
  for (std::int64_t m = 0; m < total; ++m) {
    const std::int64_t first = m * options_.micro_batch_size;
    const std::int64_t count = std::min(options_.micro_batch_size, data.size() - first);
    const at::Tensor ids = data.batch(first, count);
    ScopedPhase phase("forward");
    at::Tensor x = model_.is_first() ? model_.embed(ids) : receive_hidden(count, len, m);
    for (std::size_t i = 0; i < model_.decoder().size(); ++i) x = model_.layer_forward(i, x, pos);
    if (model_.is_last()) {
      const at::Tensor logits = model_.head(x);
      const double nll = next_token_nll_sum(logits, ids).item<double>();
      check_finite_loss(nll, m, first, count, data);
      totals.nll_sum += nll;
      totals.predicted_tokens += count * (len - 1);
      totals.sequences += count;
      if (on_logits) on_logits(m, ids, logits);
    } else {
      const at::Tensor out = x.contiguous();
      ScopedPhase send("communication");
      comm_.send(out, model_.rank() + 1, tag(m, kForward));
    }
    if (on_progress) on_progress(m + 1, total);
  }
  share_totals(totals);
  return totals;
}

LossTotals Pipeline::calibrate(const TokenSequences& data, const GradientCallback& on_grads,
                               const LinearObserver* observer, const LogitsCallback& on_logits,
                               const ProgressCallback& on_progress, const RoundCallback& after_round,
                               const ResumePoint& resume, const LinearObserver* replay) {
  // With recompute the forward pass builds no graph; the backward pass builds one layer's.
  const bool recompute = options_.backward && options_.recompute;
  at::AutoGradMode grad_mode(options_.backward && !recompute);
  const std::int64_t len = data.seq_len(), total = micro_batches(data);
  const PositionTables pos = position_tables(model_.config(), len, model_.dtype());
  const std::size_t layers = model_.decoder().size();
  const std::int64_t first_micro_batch = resume.micro_batch;
  CSAQ_CHECK(first_micro_batch >= 0, "resume point ", first_micro_batch, " is negative");
  LossTotals totals = model_.is_last() ? resume.totals : LossTotals{};
  std::int64_t done = first_micro_batch;

  for (std::int64_t round = first_micro_batch, round_end = 0; round < total; round = round_end) {
    // Up to in_flight micro-batches, never past a multiple of `align`.
    round_end = std::min(total, round + options_.in_flight);
    if (options_.align > 0) round_end = std::min(round_end, (round / options_.align + 1) * options_.align);
    std::vector<InFlight> flight(static_cast<std::size_t>(round_end - round));

    // Forward every micro-batch of the round, keeping each layer's graph separately.
    for (std::int64_t m = round; m < round_end; ++m) {
      InFlight& f = flight[m - round];
      const std::int64_t first = m * options_.micro_batch_size;
      const std::int64_t count = std::min(options_.micro_batch_size, data.size() - first);
      f.ids = data.batch(first, count);
      ScopedPhase phase("forward");
      at::Tensor x;
      if (model_.is_first()) {
        x = model_.embed(f.ids);  // no gradient flows into the embedding
      } else {
        x = receive_hidden(count, len, m).requires_grad_(options_.backward && !recompute);
      }
      if (recompute) f.outputs.resize(layers);
      for (std::size_t i = 0; i < layers; ++i) {
        if (i > 0) x = x.detach().requires_grad_(options_.backward && !recompute);
        if (options_.backward) f.inputs.push_back(x);
        x = model_.layer_forward(i, x, pos, observer);
        if (options_.backward && !recompute) f.outputs.push_back(x);
      }
      if (model_.is_last()) {
        at::AutoGradMode head_grad(options_.backward);
        f.head_input = x.detach().requires_grad_(options_.backward);
        const at::Tensor logits = model_.head(f.head_input);
        const std::int64_t predicted = count * (len - 1);
        const at::Tensor nll = next_token_nll_sum(logits, f.ids);
        const double nll_value = nll.item<double>();
        check_finite_loss(nll_value, m, first, count, data);
        totals.nll_sum += nll_value;
        totals.predicted_tokens += predicted;
        totals.sequences += count;
        const at::Tensor scored =
            options_.labels == Labels::kSampled && options_.backward
                ? next_token_nll_sum(logits, sample_next_tokens(logits, f.ids, label_seed(options_.label_seed, m)))
                : nll;
        f.loss = scored / static_cast<double>(predicted);
        if (on_logits) on_logits(m, f.ids, logits.detach());
      } else {
        const at::Tensor out = x.detach().contiguous();
        ScopedPhase send("communication");
        comm_.send(out, model_.rank() + 1, tag(m, kForward));
      }
    }

    if (!options_.backward) {
      for (std::int64_t m = round; m < round_end; ++m)
        if (on_progress) on_progress(++done, total);
      flight.clear();
    }
    // Backward in the order of the forward passes, layer by layer; weight gradients live one
    // layer at a time. Statistics thus add up micro-batch by micro-batch in ascending order,
    // the same for every number in flight.
    for (std::int64_t m = round; options_.backward && m < round_end; ++m) {
      InFlight& f = flight[m - round];
      ScopedPhase phase("backward");
      at::Tensor grad;
      if (model_.is_last()) {
        grad = torch::autograd::grad({f.loss}, {f.head_input})[0];
        f.loss = at::Tensor();
        f.head_input = at::Tensor();
      } else {
        grad = at::empty({f.ids.size(0), len, model_.config().hidden_size},
                         at::TensorOptions().dtype(model_.dtype()));
        ScopedPhase wait("communication");
        comm_.recv(grad, model_.rank() + 1, tag(m, kBackward));
      }
      for (std::size_t i = layers; i-- > 0;) {
        const DecoderLayer& layer = model_.decoder()[i];
        // The input of the rank's first layer needs no gradient on the first rank (the
        // embedding's output).
        const bool input_grad = i > 0 || !model_.is_first();
        if (recompute) {
          at::AutoGradMode replay_grad(true);
          ScopedPhase again("recompute");
          f.inputs[i] = f.inputs[i].detach().requires_grad_(input_grad);
          f.outputs[i] = model_.layer_forward(i, f.inputs[i], pos, replay);
        }
        std::vector<at::Tensor> wrt;
        for (const auto& lin : layer.linears) wrt.push_back(lin.weight);
        if (input_grad) wrt.push_back(f.inputs[i]);
        std::vector<at::Tensor> grads = torch::autograd::grad({f.outputs[i]}, wrt, {grad});
        f.outputs[i] = at::Tensor();
        f.inputs[i] = at::Tensor();
        LayerGradients lg;
        lg.micro_batch = m;
        lg.layer = &layer;
        for (int j = 0; j < kNumLinears; ++j) lg.weight_grads[j] = std::move(grads[j]);
        grad = input_grad ? std::move(grads[kNumLinears]) : at::Tensor();
        if (on_grads) on_grads(lg);
      }
      if (!model_.is_first()) {
        const at::Tensor out = grad.contiguous();
        ScopedPhase send("communication");
        comm_.send(out, model_.rank() - 1, tag(m, kBackward));
      }
      if (on_progress) on_progress(++done, total);
    }
    const std::int64_t sequences_done = std::min(data.size(), round_end * options_.micro_batch_size);
    if (after_round && after_round(RoundInfo{sequences_done, round_end, total, totals})) break;
  }
  share_totals(totals);
  return totals;
}

}  // namespace csaq
