#include "plan.h"

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <regex>

#include "commands.h"

namespace csaq::cli {
namespace {

// Measured, not derived: what a csaq process adds over its start besides its tensors (OpenBLAS
// and OpenMP buffers, MPI and HDF5 state): the peak of a quantize run of a model of 0.1 M
// parameters was 27-31 MiB over the start on 1, 2 and 3 ranks (docs/planning.md).
constexpr std::int64_t kRuntimeBytes = std::int64_t{30} << 20;

std::int64_t bytes_of(at::ScalarType t) { return static_cast<std::int64_t>(c10::elementSize(t)); }

// Elementwise operations per weight of one clip-search step (scale, round, clamp, error).
constexpr double kClipFlopsPerWeight = 10.0;

struct LinearShape {
  std::int64_t out = 0, in = 0;
  std::int64_t weights() const { return out * in; }
};

std::vector<LinearShape> shapes_of(const ModelConfig& c) {
  std::vector<LinearShape> v;
  for (const auto& [out, in] : linear_shapes(c)) v.push_back({out, in});
  return v;
}

// The width of each of a layer's distinct Linear inputs (the Profiler keeps one Hessian each:
// see input_of).
std::vector<std::int64_t> hessian_inputs(const ModelConfig& c) {
  const auto s = shapes_of(c);
  std::vector<std::int64_t> in(kNumInputs, 0);
  for (int i = 0; i < kNumLinears; ++i) in[static_cast<std::size_t>(input_of(i))] = s[static_cast<std::size_t>(i)].in;
  return in;
}

// Fitted on measured runs (docs/planning.md), these three: a quantizer pass over one Linear
// holds, besides the weights, this much per weight (the clip search's [rows, in] temporaries,
// int64 codes and float32 values, ΔW and the cost model's products, not all at once);
constexpr std::int64_t kQuantizeBytesPerWeight = 20;

// GPTQ's factor of an input's Hessian, per entry: while it is computed, at most two float64
// copies, 16 bytes, where each copy is larger than glibc's largest dynamic mmap threshold
// (32 MiB), so that it is mapped on its own and unmapped when freed (a model whose down_proj
// input is 6144 wide measured 15.7 on 1 and 2 threads); smaller copies come from the heap,
// whose holes the factorisations of successive Linears leave: 44 bytes measured there
// (docs/planning.md);
std::int64_t gptq_factor_bytes(std::int64_t in) {
  constexpr std::int64_t kLargestMmapThreshold = std::int64_t{32} << 20;
  return in * in * (8 * in * in >= kLargestMmapThreshold ? 16 : 44);
}

// and the peak resident set of calibration exceeds the tensors counted here (the saved
// activations, one layer's backward) by this factor: what glibc's allocator keeps between
// micro-batches and autograd's smaller temporaries.
constexpr double kTransientOverhead = 1.4;

}  // namespace

std::int64_t layer_activation_bytes(const ModelConfig& c, std::int64_t batch, std::int64_t seq_len,
                                    at::ScalarType dtype) {
  // Per token (T = batch x seq_len), following layer_forward: the two RMSNorms keep 12 bytes
  // per hidden unit whatever the dtype (float32: the norm output, the residual and the second
  // norm output; otherwise each norm's float32 input and its output); q, k and v after RoPE
  // and head repetition, and the attention output, as the contiguous copies the products
  // save (4 x q); the MLP's gate output, its SiLU, the up output and their product (4 x I).
  // Per head: the float32 softmax, and the probabilities in the compute dtype when that is
  // not float32.
  const std::int64_t s = bytes_of(dtype), tokens = batch * seq_len;
  const std::int64_t q = c.num_heads * c.head_dim;
  const std::int64_t per_token = 12 * c.hidden_size + 4 * s * q + 4 * s * c.intermediate_size;
  const std::int64_t attention = batch * c.num_heads * seq_len * seq_len * (4 + (s != 4 ? s : 0));
  return tokens * per_token + attention;
}

double Work::solve_critical() const {
  return solve_per_rank.empty() ? 0 : *std::max_element(solve_per_rank.begin(), solve_per_rank.end());
}
double Work::pack_critical() const {
  return pack_per_rank.empty() ? 0 : *std::max_element(pack_per_rank.begin(), pack_per_rank.end());
}

std::int64_t RunPlan::peak() const {
  std::int64_t p = 0;
  for (const auto& r : ranks) p = std::max(p, r.peak);
  return p;
}

RunPlan plan_run(const ModelConfig& c, int world, const RunShape& run, std::int64_t sequences) {
  RunPlan plan;
  const std::vector<LayerRange> partition = partition_model(c, world);  // the one load_model_shard uses
  const auto linears = shapes_of(c);
  const auto inputs = hessian_inputs(c);
  const std::int64_t s = bytes_of(run.compute), f = bytes_of(run.stored);
  const std::int64_t h = c.hidden_size, vocab = c.vocab_size, embed = vocab * h;
  const std::int64_t layer_params = static_cast<std::int64_t>(layer_parameters(c));
  std::int64_t layer_linear = 0, largest = 0;
  for (const auto& l : linears) {
    layer_linear += l.weights();
    largest = std::max(largest, l.weights());
  }
  plan.decoder_weights = layer_linear * c.num_layers;
  plan.parameters = layer_params * c.num_layers + (c.tie_word_embeddings ? 1 : 2) * embed + h;

  // Calibration: micro-batches, rounds (never crossing an early-stopping check) and tokens.
  const std::int64_t seqs = sequences >= 0 ? sequences : run.samples;
  const std::int64_t b = run.batch_size, len = run.seq_len, tokens = b * len;
  plan.micro_batches = (seqs + b - 1) / b;
  plan.round_size = run.gradients() && run.align > 0 ? std::min(run.in_flight, run.align) : run.in_flight;
  plan.rounds = (plan.micro_batches + plan.round_size - 1) / plan.round_size;

  // Statistics per layer (Profiler): the per-weight accumulators kept, the per-row and
  // per-column sums, the early-stopping sample, the co-activation counters (csaq, once
  // calibration has seen a batch) and the four input Hessians (all but rtn).
  const ProfilerOptions& p = run.profiler;
  const int kept = (p.keep_grad_sum ? 1 : 0) + (p.keep_causal ? 1 : 0) + (p.keep_fisher ? 1 : 0);
  std::int64_t accumulators_per_layer = 0, coact_per_layer = 0;
  for (const auto& l : linears) {
    accumulators_per_layer += 4 * kept * l.weights() + 8 * (l.out + l.in) + 8 * p.sample_per_linear;
    const std::int64_t k = std::min(l.out, p.candidates);
    if (run.calibrates() && p.coactivation) coact_per_layer += 8 * k * k + 8 * k;
  }
  // Each input's Hessian: one triangle kept, the whole matrix made for one input at a time
  // (solve, pack, writing statistics) and stored whole in files.
  std::int64_t hessians_per_layer = 0, whole_hessians_per_layer = 0, whole_hessian_max = 0;
  if (p.hessians)
    for (std::int64_t in : inputs) {
      hessians_per_layer += GramMatrix::bytes_for(in);
      whole_hessians_per_layer += 4 * in * in;
      whole_hessian_max = std::max(whole_hessian_max, 4 * in * in);
    }

  // Activations of one micro-batch per layer on a rank: saved tensors plus the layer's output
  // (the next layer's input); with gradients off only one layer's worth at a time.
  const std::int64_t saved = layer_activation_bytes(c, b, len, run.compute);
  const std::int64_t boundary = tokens * h * s;
  const std::int64_t head_saved = tokens * h * (s == 4 ? 4 : 4 + s) + b * (len - 1) * vocab * 4;
  const std::int64_t attention_scores = b * c.num_heads * len * len;
  // One layer's backward: its weight gradients all at once, then the attention and MLP
  // gradients or the salience fold's float32 temporaries, whichever is larger.
  const std::int64_t backward_temporaries =
      std::max(attention_scores * (4 + s) + 3 * tokens * c.intermediate_size * s + 2 * tokens * c.num_heads * c.head_dim * s,
               largest * 4 * (s != 4 ? 2 : 1));
  const std::int64_t head_backward = 3 * b * len * vocab * 4 + tokens * h * 4;

  // Quantizer work per Linear: the largest Linear's temporaries, the largest input's whole
  // Hessian (made from its triangle while its Linears are solved and packed) and factor.
  const bool gptq = run.solver.quantizer.gptq && run.calibrates();
  const bool uniform = run.solver.kind == SolverKind::kUniform;
  std::int64_t factor = 0;
  for (std::int64_t in : inputs)
    factor = std::max(factor, (p.hessians ? 4 * in * in : 0) + (gptq ? gptq_factor_bytes(in) : 0));
  std::int64_t clique_work = 0;
  if (run.gradients())
    for (const auto& l : linears) clique_work = std::max(clique_work, 3 * 8 * std::min(l.out, p.candidates) * std::min(l.out, p.candidates));
  // Refinement (--refine-sweeps) adds its copies of the codes and values and the running
  // Δ H, 16 bytes per weight of the Linear it works on.
  const bool refine = run.solver.quantizer.refine_sweeps > 0 && p.hessians && run.calibrates();
  const std::int64_t quantize_work = (kQuantizeBytesPerWeight + (refine ? 16 : 0)) * largest + factor;

  // FLOPs per token and layer: forward 2 per weight plus attention (QKᵀ and PV on the full
  // square: 4·L·q), backward twice that (input and weight gradients); Hessians one
  // multiply-add per upper-triangle entry.
  const double q_dim = static_cast<double>(c.num_heads * c.head_dim);
  const double fwd_layer = 2.0 * static_cast<double>(layer_linear) + 4.0 * static_cast<double>(len) * q_dim;
  double hessian_layer = 0;
  for (std::int64_t in : inputs) hessian_layer += static_cast<double>(in) * static_cast<double>(in + 1);
  // (recompute: one forward pass more).
  const double calib_layer = (run.gradients() ? (run.recompute ? 4.0 : 3.0) : 1.0) * fwd_layer + hessian_layer;
  const double head_token = (run.gradients() ? 4.0 : 2.0) * static_cast<double>(vocab) * static_cast<double>(h);
  // Solve: every format of every Linear is quantized (GPTQ: 2·out·in² and the factor of each
  // input, 2·in³; clip search) and costed (the second-order term: 2·out·in²).
  const std::vector<Format> formats_any = linear_formats(linears[0].in, run.solver.bit_options, run.solver.group_options);
  const double formats = static_cast<double>(formats_any.size());
  const bool second_order = p.kind == SalienceKind::kTaylor || p.kind == SalienceKind::kHessian;
  double solve_layer = 0, pack_layer = 0;
  for (const auto& l : linears) {
    const double w = static_cast<double>(l.weights()), in = static_cast<double>(l.in);
    // (refinement: Δ H once, then 2·out·in per column moved, at most `sweeps` passes: counted
    // as one pass's worth, 2·out·in², plus the product.)
    const double quantize = (gptq ? 2.0 * w * in : 0.0) + (run.solver.quantizer.clip_steps + 1) * kClipFlopsPerWeight * w +
                            (refine ? 4.0 * w * in : 0.0);
    if (!uniform) solve_layer += formats * (quantize + (run.gradients() && second_order ? 2.0 * w * in : 0.0));
    pack_layer += quantize;
  }
  if (gptq)
    for (std::int64_t in : inputs) {
      if (!uniform) solve_layer += 2.0 * std::pow(static_cast<double>(in), 3);
      pack_layer += 2.0 * std::pow(static_cast<double>(in), 3);
    }
  const double target = run.solver.target_bits;

  double slowest_micro_batch = 0;
  for (int r = 0; r < world; ++r) {
    RankMemory m;
    m.rank = r;
    m.layers = partition[static_cast<std::size_t>(r)];
    const std::int64_t nl = m.layers.size();
    m.linear_weights = nl * layer_linear;
    const bool first = r == 0, last = r == world - 1;
    const std::int64_t own_params = nl * layer_params + (first ? embed : 0) + (last ? embed + h : 0);
    m.weights = own_params * s;
    // Safetensors pages are mapped while this rank's tensors are copied out of them.
    m.load_mapping = own_params * f;
    m.accumulators = nl * accumulators_per_layer;
    m.hessians = nl * hessians_per_layer;
    m.coactivation = nl * coact_per_layer;
    m.runtime = kRuntimeBytes;
    // Writing the statistics (a calibration checkpoint, the end of calibration included, or
    // the salience file) makes each input's whole Hessian from its triangle, one at a time.
    m.save_work = whole_hessian_max;
    const std::int64_t statistics = m.accumulators + m.hessians + m.coactivation;
    if (run.calibrates()) {
      if (run.gradients()) {
        // With recompute a micro-batch keeps its layers' inputs only, and one layer's saved
        // tensors exist at a time, inside the backward pass, made by a forward pass whose
        // attention temporaries (the scores before and after masking, float32) the allocator
        // still holds when the backward's are made (measured: RecomputeLowersTheCalibration-
        // PeakAsPlanned in tests/plan_test.cpp).
        const std::int64_t replay = run.recompute ? saved + 2 * attention_scores * 4 : 0;
        const std::int64_t per_micro_batch =
            nl * ((run.recompute ? 0 : saved) + boundary) + boundary + (last ? head_saved : 0);
        m.activations = static_cast<std::int64_t>(kTransientOverhead * static_cast<double>(run.in_flight * per_micro_batch));
        m.backward = static_cast<std::int64_t>(
            kTransientOverhead * static_cast<double>(std::max(replay + layer_params * s + backward_temporaries,
                                                              last ? head_backward : std::int64_t{0})));
      } else {  // forward passes only: one layer's tensors at a time, then the next
        m.activations = static_cast<std::int64_t>(kTransientOverhead *
                                                  static_cast<double>(saved + 2 * boundary + (last ? b * len * vocab * (s + 4) : 0)));
      }
    }
    if (run.command == "quantize") {
      // The uniform methods' solve quantizes nothing: it picks the widest format that fits.
      m.solve_work = uniform ? 0 : quantize_work + clique_work;
      m.pack_work = quantize_work;
      // The packed share: its Linears at the target (total bits never exceed it).
      m.packed = static_cast<std::int64_t>(std::ceil(target * static_cast<double>(m.linear_weights) / 8.0));
    }
    const std::int64_t base = m.runtime + m.weights;
    m.stages.emplace_back("load", base + m.load_mapping);
    if (run.calibrates())
      m.stages.emplace_back("calibration", base + statistics + std::max(m.activations + m.backward, m.save_work));
    if (run.command == "quantize") {
      m.stages.emplace_back("solve", base + statistics + m.solve_work);
      m.stages.emplace_back("pack", base + statistics + m.packed + m.pack_work);
    } else {
      m.stages.emplace_back("save", base + statistics + m.save_work);
    }
    for (const auto& [name, bytes] : m.stages)
      if (bytes > m.peak) {
        m.peak = bytes;
        m.peak_stage = name;
      }

    const double layers = static_cast<double>(nl);
    const double per_micro_batch =
        static_cast<double>(tokens) * (layers * calib_layer + (last ? head_token : 0.0));
    slowest_micro_batch = std::max(slowest_micro_batch, per_micro_batch);
    plan.work.calibration_per_rank.push_back(run.calibrates() ? per_micro_batch * static_cast<double>(plan.micro_batches) : 0.0);
    plan.work.solve_per_rank.push_back(layers * solve_layer);
    plan.work.pack_per_rank.push_back(layers * pack_layer);
    plan.ranks.push_back(std::move(m));
  }
  // Each round: m micro-batches through `world` stages in m + world - 1 steps, forward and
  // backward alike; the last round may be shorter.
  const std::int64_t full = plan.micro_batches / plan.round_size, rest = plan.micro_batches % plan.round_size;
  const double steps = static_cast<double>(full * (plan.round_size + world - 1) + (rest > 0 ? rest + world - 1 : 0));
  plan.work.calibration_critical = run.calibrates() ? steps * slowest_micro_batch : 0.0;

  // Files. A calibration checkpoint (or salience file) stores the statistics (Hessians in
  // full); the output stores every Linear at the target, at most, and the dense tensors in
  // the checkpoint's dtype.
  for (const auto& m : plan.ranks)
    plan.checkpoint_bytes += m.accumulators + m.layers.size() * whole_hessians_per_layer + m.coactivation;
  const std::int64_t dense = (c.tie_word_embeddings ? 1 : 2) * embed + h +
                             c.num_layers * (layer_params - layer_linear);
  if (run.command == "quantize")
    plan.output_bytes = static_cast<std::int64_t>(std::ceil(target * static_cast<double>(plan.decoder_weights) / 8.0)) + dense * f;
  return plan;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (std::fabs(bytes) >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return buf;
}

std::int64_t parse_bytes(const std::string& text, const std::string& option) {
  // A number, then optionally K, M, G or T with "iB" (powers of 1024), "B" (powers of 1000)
  // or nothing (1024, as SLURM's --mem).
  static const std::regex re(R"(^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*(?:([KkMmGgTt])(i?)([Bb]?))?\s*$)");
  std::smatch m;
  if (!std::regex_match(text, m, re))
    throw UsageError{option + " '" + text + "' is not a size (examples: 80GiB, 80GB, 512MiB, 1e9)"};
  const std::string unit = m[2].str();
  const double base = !unit.empty() && m[3].str().empty() && !m[4].str().empty() ? 1000.0 : 1024.0;
  const int power = unit.empty() ? 0 : static_cast<int>(std::string("KMGT").find(static_cast<char>(std::toupper(unit[0])))) + 1;
  const double bytes = std::stod(m[1].str()) * std::pow(base, power);
  if (!(bytes >= 1) || bytes > 9.0e18) throw UsageError{option + " '" + text + "' is not a usable size"};
  return static_cast<std::int64_t>(bytes);
}

nlohmann::json plan_json(const RunPlan& plan) {
  nlohmann::json ranks = nlohmann::json::array();
  for (const auto& m : plan.ranks) {
    nlohmann::json stages = nlohmann::json::object();
    for (const auto& [name, bytes] : m.stages) stages[name] = bytes;
    ranks.push_back({{"rank", m.rank},
                     {"layers", {m.layers.begin, m.layers.end}},
                     {"linear_weights", m.linear_weights},
                     {"bytes", {{"weights", m.weights},
                                {"accumulators", m.accumulators},
                                {"hessians", m.hessians},
                                {"coactivation", m.coactivation},
                                {"packed_output", m.packed},
                                {"load_mapping", m.load_mapping},
                                {"activations", m.activations},
                                {"backward", m.backward},
                                {"solve_work", m.solve_work},
                                {"pack_work", m.pack_work},
                                {"save_work", m.save_work},
                                {"runtime", m.runtime}}},
                     {"stages", stages},
                     {"peak_bytes", m.peak},
                     {"peak_stage", m.peak_stage}});
  }
  return {{"ranks", ranks},
          {"peak_bytes", plan.peak()},
          {"decoder_weights", plan.decoder_weights},
          {"parameters", plan.parameters},
          {"micro_batches", plan.micro_batches},
          {"round_size", plan.round_size},
          {"rounds", plan.rounds},
          {"disk", {{"calibration_checkpoint_bytes", plan.checkpoint_bytes}, {"output_bytes_at_most", plan.output_bytes}}},
          {"flops", {{"calibration_per_rank", plan.work.calibration_per_rank},
                     {"calibration_critical_path", plan.work.calibration_critical},
                     {"solve_per_rank", plan.work.solve_per_rank},
                     {"pack_per_rank", plan.work.pack_per_rank}}}};
}

}  // namespace csaq::cli
