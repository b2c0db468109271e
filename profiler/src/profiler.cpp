#include "csaq/profiler/profiler.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <array>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "csaq/shard/phases.h"
#include "csaq/storage/error.h"
#include "csaq/storage/h5.h"

namespace csaq {

namespace {
constexpr std::array<const char*, kNumInputs> kInputNames{"qkv", "o", "gate_up", "down"};
constexpr std::array<int, kNumInputs> kFirstReader{0, 3, 4, 6};
}  // namespace

SalienceKind parse_salience_kind(const std::string& name) {
  for (SalienceKind k : {SalienceKind::kTaylor, SalienceKind::kHessian, SalienceKind::kPqi, SalienceKind::kCausal,
                         SalienceKind::kFisher, SalienceKind::kActivation, SalienceKind::kMagnitude})
    if (name == salience_kind_name(k)) return k;
  CSAQ_FAIL("unknown salience '", name, "' (choose taylor, hessian, pqi, causal, fisher, activation or magnitude)");
}

const char* salience_kind_name(SalienceKind kind) {
  switch (kind) {
    case SalienceKind::kTaylor: return "taylor";
    case SalienceKind::kHessian: return "hessian";
    case SalienceKind::kPqi: return "pqi";
    case SalienceKind::kCausal: return "causal";
    case SalienceKind::kFisher: return "fisher";
    case SalienceKind::kActivation: return "activation";
    case SalienceKind::kMagnitude: return "magnitude";
  }
  return "?";
}

bool is_per_weight(SalienceKind kind) {
  return kind == SalienceKind::kCausal || kind == SalienceKind::kFisher || kind == SalienceKind::kActivation ||
         kind == SalienceKind::kMagnitude;
}

void ProfilerOptions::keep_for(SalienceKind cost, bool gradients) {
  keep_grad_sum = gradients && (cost == SalienceKind::kTaylor || cost == SalienceKind::kPqi);
  keep_causal = gradients && cost == SalienceKind::kCausal;
  keep_fisher = gradients && cost == SalienceKind::kFisher;
}

namespace {
// A per-weight accumulator this profiler keeps, or an error naming the cost model to
// profile with.
const at::Tensor& kept(const at::Tensor& t, const char* name, const char* profile_with) {
  CSAQ_CHECK(t.defined(), "no '", name, "' statistics were accumulated (they are kept only for the cost models that "
             "use them); profile with --salience ", profile_with);
  return t;
}
at::Tensor zeros_if(bool keep, std::int64_t out, std::int64_t in) {
  return keep ? at::zeros({out, in}, at::kFloat) : at::Tensor();
}

}  // namespace

int input_of(int linear) {
  static constexpr std::array<int, kNumLinears> kInput{0, 0, 0, 1, 2, 2, 3};
  return kInput.at(static_cast<std::size_t>(linear));
}

Profiler::Profiler(const ModelShard& model, Communicator& comm, ProfilerOptions options)
    : model_(model), comm_(comm), options_(options) {
  for (const DecoderLayer& layer : model_.decoder()) {
    for (int i = 0; i < kNumLinears; ++i) {
      const at::Tensor& w = layer.linears[i].weight;
      const std::int64_t out = w.size(0), in = w.size(1);
      stats_.push_back(LinearStats{layer.index, i, zeros_if(options_.keep_grad_sum, out, in),
                                   zeros_if(options_.keep_causal, out, in), zeros_if(options_.keep_fisher, out, in),
                                   at::zeros({out}, at::kDouble), at::zeros({out}, at::kDouble),
                                   at::zeros({in}, at::kDouble), at::Tensor(), 0, 0,
                                   CoActivation(out, options_.candidates, options_.fire_fraction)});
      // The same weights are sampled for a Linear whatever rank holds it.
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(
          options_.seed + static_cast<std::uint64_t>(layer.index * kNumLinears + i));
      sample_index_.push_back(at::randint(out * in, {options_.sample_per_linear}, gen, at::kLong));
    }
    for (int k = 0; k < kNumInputs; ++k) {
      const std::int64_t in = layer.linears[kFirstReader[k]].weight.size(1);
      hessian_.push_back(options_.hessians ? GramMatrix(in) : GramMatrix());
      hessian_tokens_.push_back(0);
    }
  }
  observer_ = [this](std::int64_t layer, int linear, const at::Tensor& input, const at::Tensor& output) {
    LinearStats& s = stats_[index(layer, linear)];
    const at::Tensor x = input.detach().reshape({-1, input.size(-1)});
    {
      ScopedPhase phase("input_statistics");
      s.input_abs_sum += x.abs().sum(0, /*keepdim=*/false, at::kDouble);
      s.tokens += x.size(0);
    }
    if (options_.coactivation) {
      ScopedPhase phase("coactivation");
      s.coact.observe(output);
    }
    const int k = input_of(linear);
    if (options_.hessians && kFirstReader[k] == linear) {
      ScopedPhase phase("hessian");
      const std::size_t h = hessian_index(layer, k);
      const at::Tensor xf = x.to(at::kFloat);
      if (h == full_index_) {  // the whole matrix made before is out of date
        full_ = at::Tensor();
        full_index_ = kNoHessian;
      }
      hessian_[h].add(xf);
      hessian_tokens_[h] += x.size(0);
    }
    replay_observer_(layer, linear, input, output);
  };
  // The output gradient of this micro-batch's loss, when the backward pass reaches it (the
  // pipeline's replay, with recompute, sees only this part).
  replay_observer_ = [this](std::int64_t layer, int linear, const at::Tensor&, const at::Tensor& output) {
    if (!output.requires_grad()) return;
    at::Tensor* energy = &stats_[index(layer, linear)].out_grad_sq;
    output.register_hook([energy](const at::Tensor& g) {
      ScopedPhase phase("output_gradient_energy");
      energy->add_(g.detach().reshape({-1, g.size(-1)}).to(at::kDouble).square().sum(0));
    });
  };
}

std::size_t Profiler::index(std::int64_t layer, int linear) const {
  CSAQ_ASSERT(model_.layers().contains(layer), "layer ", layer, " is not on rank ", model_.rank());
  return static_cast<std::size_t>((layer - model_.layers().begin) * kNumLinears + linear);
}

const LinearStats& Profiler::stats(std::int64_t layer, int linear) const { return stats_[index(layer, linear)]; }

std::size_t Profiler::hessian_index(std::int64_t layer, int input) const {
  return static_cast<std::size_t>((layer - model_.layers().begin) * kNumInputs + input);
}

const Linear& Profiler::weights(std::int64_t layer, int linear) const {
  return model_.decoder()[static_cast<std::size_t>(layer - model_.layers().begin)].linears[linear];
}

at::Tensor Profiler::hessian(std::int64_t layer, int input) const {
  CSAQ_ASSERT(model_.layers().contains(layer) && input >= 0 && input < kNumInputs && options_.hessians);
  const std::size_t h = hessian_index(layer, input);
  if (h != full_index_) {
    full_ = at::Tensor();  // freed first, unless a caller still holds it
    full_ = hessian_[h].full();
    full_index_ = h;
  }
  return full_;
}

std::int64_t Profiler::hessian_tokens(std::int64_t layer, int input) const {
  CSAQ_ASSERT(model_.layers().contains(layer) && input >= 0 && input < kNumInputs);
  return hessian_tokens_[hessian_index(layer, input)];
}

GradientCallback Profiler::gradient_callback() {
  return [this](const LayerGradients& g) {
    ScopedPhase phase("salience_fold");
    for (int i = 0; i < kNumLinears; ++i) {
      LinearStats& s = stats_[index(g.layer->index, i)];
      const at::Tensor grad = g.weight_grads[i].to(at::kFloat);
      const at::Tensor w = g.layer->linears[i].weight.detach().to(at::kFloat);
      if (s.grad_sum.defined()) s.grad_sum.add_(grad);
      const at::Tensor causal = (grad * w).abs_();
      s.causal_rows += causal.sum(1, /*keepdim=*/false, at::kDouble);
      if (s.causal.defined()) s.causal.add_(causal);
      if (s.fisher.defined()) s.fisher.addcmul_(grad, grad);
      ++s.micro_batches;
    }
  };
}

void Profiler::integrate_pqi(ModelShard& model, const TokenSequences& data, const PipelineOptions& options,
                             std::size_t formats, int points, const DeltaOf& delta_of, const ProgressCallback& progress) {
  CSAQ_ASSERT(&model == &model_ && options.backward);
  CSAQ_CHECK(points >= 1 && points <= 3, "the post-quantization integral takes 1, 2 or 3 points, not ", points);
  std::vector<std::pair<double, double>> rule;  // Gauss-Legendre on [0, 1]: point, weight
  if (points == 1) rule = {{0.5, 1.0}};
  if (points == 2) rule = {{0.5 - 0.5 / std::sqrt(3.0), 0.5}, {0.5 + 0.5 / std::sqrt(3.0), 0.5}};
  if (points == 3) rule = {{0.5 - 0.5 * std::sqrt(0.6), 5.0 / 18}, {0.5, 8.0 / 18}, {0.5 + 0.5 * std::sqrt(0.6), 5.0 / 18}};
  Pipeline pipeline(model, comm_, options);
  const double per_batch = 1.0 / static_cast<double>(std::max<std::int64_t>(1, pipeline.micro_batches(data)));
  std::vector<at::Tensor> originals;
  for (const auto& s : stats_) originals.push_back(weights(s.layer, s.linear).weight.detach().clone());
  auto move = [&](const std::vector<at::Tensor>& deltas, double t) {
    for (std::size_t k = 0; k < stats_.size(); ++k)
      model.set_linear_weight(stats_[k].layer, stats_[k].linear, t == 0 ? originals[k] : originals[k] + t * deltas[k]);
  };
  for (auto& s : stats_) s.pqi = at::zeros({static_cast<std::int64_t>(formats), s.out_grad_sq.size(0)}, at::kDouble);
  std::int64_t passes = 0;
  for (std::size_t f = 0; f < formats; ++f) {
    std::vector<at::Tensor> deltas;
    for (const auto& s : stats_) deltas.push_back(delta_of(s.layer, s.linear, f).to(at::kFloat));
    for (const auto& [t, weight] : rule) {
      move(deltas, t);
      const double scale = weight * per_batch;
      pipeline.calibrate(data, [this, &deltas, f, scale](const LayerGradients& g) {
        for (int i = 0; i < kNumLinears; ++i) {
          const std::size_t k = index(g.layer->index, i);
          const at::Tensor term = (g.weight_grads[i].to(at::kFloat) * deltas[k]).sum(1, false, at::kDouble);
          stats_[k].pqi.select(0, static_cast<std::int64_t>(f)).add_(term * scale);
        }
      });
      if (progress) progress(++passes, static_cast<std::int64_t>(formats * rule.size()));
    }
    move(deltas, 0);
  }
}

bool Profiler::has_statistics_for(SalienceKind kind) const {
  if (stats_.empty()) return true;
  const LinearStats& s = stats_.front();
  switch (kind) {
    case SalienceKind::kTaylor: return s.grad_sum.defined();
    case SalienceKind::kPqi: return s.pqi.defined();
    case SalienceKind::kCausal: return s.causal.defined();
    case SalienceKind::kFisher: return s.fisher.defined();
    default: return true;
  }
}

at::Tensor Profiler::salience(std::int64_t layer, int linear, SalienceKind kind) const {
  return salience_rows(layer, linear, kind, 0, weights(layer, linear).weight.size(0));
}

namespace {
// Mean |x| per input channel, float32, from the observer's float64 sums.
at::Tensor mean_abs_input(const LinearStats& s) {
  return (s.input_abs_sum / std::max<std::int64_t>(1, s.tokens)).to(at::kFloat);
}
}  // namespace

at::Tensor Profiler::salience_rows(std::int64_t layer, int linear, SalienceKind kind, std::int64_t begin,
                                   std::int64_t end) const {
  const LinearStats& s = stats(layer, linear);
  auto w = [&] { return weights(layer, linear).weight.detach().slice(0, begin, end).to(at::kFloat); };
  switch (kind) {
    case SalienceKind::kCausal: return kept(s.causal, "causal", "causal").slice(0, begin, end);
    case SalienceKind::kFisher: return kept(s.fisher, "fisher", "fisher").slice(0, begin, end);
    case SalienceKind::kActivation: return w().abs() * mean_abs_input(s).unsqueeze(0);
    case SalienceKind::kMagnitude: return w().abs();
    default: CSAQ_ASSERT(false, "salience ", salience_kind_name(kind), " has no value per weight");
  }
  return {};
}

at::Tensor Profiler::salience_at(std::int64_t layer, int linear, SalienceKind kind, const at::Tensor& flat) const {
  const LinearStats& s = stats(layer, linear);
  auto w = [&] { return weights(layer, linear).weight.detach().reshape({-1}).index_select(0, flat).to(at::kFloat); };
  switch (kind) {
    case SalienceKind::kCausal: return kept(s.causal, "causal", "causal").reshape({-1}).index_select(0, flat);
    case SalienceKind::kFisher: return kept(s.fisher, "fisher", "fisher").reshape({-1}).index_select(0, flat);
    case SalienceKind::kActivation: {
      const std::int64_t in = s.input_abs_sum.size(0);
      return w().abs() * mean_abs_input(s).index_select(0, flat.remainder(in));
    }
    case SalienceKind::kMagnitude: return w().abs();
    default: CSAQ_ASSERT(false, "salience ", salience_kind_name(kind), " has no value per weight");
  }
  return {};
}

at::Tensor Profiler::row_cost(std::int64_t layer, int linear, SalienceKind kind, const at::Tensor& delta,
                              std::size_t format) const {
  const LinearStats& s = stats(layer, linear);
  if (kind == SalienceKind::kPqi) {
    CSAQ_CHECK(s.pqi.defined() && static_cast<std::int64_t>(format) < s.pqi.size(0),
               "no post-quantization integral for this format (profile with --salience pqi and the same options)");
    return s.pqi[static_cast<std::int64_t>(format)];
  }
  const at::Tensor d = delta.to(at::kFloat);
  const double m = static_cast<double>(std::max<std::int64_t>(1, s.micro_batches));
  // ½ ΔᵀGΔ per row with G = out_grad_sq_r · H / M².
  auto second_order = [&] {
    const at::Tensor dhd = (at::matmul(d, linear_hessian(layer, linear)) * d).sum(1, false, at::kDouble);
    return s.out_grad_sq * dhd / (2.0 * m * m);
  };
  const at::Tensor w = weights(layer, linear).weight.detach().to(at::kFloat);
  switch (kind) {
    case SalienceKind::kTaylor:
      return (kept(s.grad_sum, "grad_sum", "taylor") * d).sum(1, false, at::kDouble) / m + second_order();
    case SalienceKind::kHessian: return second_order();
    case SalienceKind::kPqi: break;  // above
    case SalienceKind::kCausal: {
      // s_w / |w| = Σ|g|, 0 where w is 0 (there the salience is 0 as well).
      const at::Tensor per =
          at::where(w.abs() > 0, kept(s.causal, "causal", "causal") / w.abs().clamp_min(1e-30), at::zeros_like(w));
      return (per * d.abs()).sum(1, false, at::kDouble);
    }
    case SalienceKind::kFisher: return (kept(s.fisher, "fisher", "fisher") * d.square()).sum(1, false, at::kDouble) * 0.5;
    case SalienceKind::kActivation: return (mean_abs_input(s).unsqueeze(0) * d.abs()).sum(1, false, at::kDouble);
    case SalienceKind::kMagnitude: return d.abs().sum(1, false, at::kDouble);
  }
  return {};
}

at::Tensor Profiler::row_leaders(std::int64_t layer, int linear, double clique_threshold) const {
  // Leaders by the row sums of the causal salience (accumulated as such, so that they need no
  // per-weight causal accumulator), or of the per-weight salience the cost model is.
  const SalienceKind kind = options_.kind;
  const LinearStats& s = stats(layer, linear);
  if (!is_per_weight(kind) || kind == SalienceKind::kCausal) return find_cliques(s.coact, s.causal_rows, clique_threshold);
  return find_cliques(s.coact, salience(layer, linear, kind).sum(1), clique_threshold);
}

at::Tensor Profiler::global_sample() const {
  const std::int64_t m = options_.sample_per_linear;
  const SalienceKind kind = options_.kind;
  at::Tensor all = at::zeros({model_.config().num_layers * kNumLinears * m}, at::kFloat);
  for (std::size_t k = 0; k < stats_.size(); ++k) {
    const LinearStats& s = stats_[k];
    const std::int64_t slot = s.layer * kNumLinears + s.linear;
    // The statistic the cost depends on most: the mean gradient for taylor and pqi, the
    // output-gradient energy of the sampled weights' rows for hessian (its curvature factor),
    // the per-weight salience itself for the others.
    at::Tensor v;
    if (kind == SalienceKind::kTaylor || kind == SalienceKind::kPqi)
      v = kept(s.grad_sum, "grad_sum", "taylor").reshape({-1}).index_select(0, sample_index_[k]);
    else if (kind == SalienceKind::kHessian)
      v = s.out_grad_sq.index_select(0, sample_index_[k].div(s.input_abs_sum.size(0), "floor")).to(at::kFloat);
    else
      v = salience_at(s.layer, s.linear, kind, sample_index_[k]);
    all.slice(0, slot * m, (slot + 1) * m).copy_(v);
  }
  comm_.all_reduce(all, ReduceOp::kSum);  // each slot is non-zero on exactly one rank
  return all;
}

RoundCallback Profiler::round_callback() {
  // Samples every `check_every` sequences; from the second sample on, compares with the
  // previous one, and stops once `min_sequences` are done and rho is high enough. The
  // sample is all-reduced first, so every rank computes the same rho and decision.
  return [this](const RoundInfo& info) {
    const std::int64_t sequences = info.sequences_done;
    if (!options_.early_stop || sequences - last_check_ < options_.check_every) return false;
    ScopedPhase phase("early_stop");
    last_check_ = sequences;
    at::Tensor sample = global_sample();
    std::swap(sample, previous_sample_);
    if (!sample.defined()) return false;
    const double rho = spearman(sample, previous_sample_);
    checks_.push_back({sequences, rho});
    stopped_early_ = sequences >= options_.min_sequences && rho >= options_.rho;
    return stopped_early_;
  };
}

namespace {
std::string stats_group(std::int64_t layer, int linear) {
  return "stats/" + std::to_string(layer) + "/" + kLinearNames.at(linear) + "/";
}

std::string hessian_name(std::int64_t layer, int input) {
  return "stats/" + std::to_string(layer) + "/hessian/" + kInputNames.at(static_cast<std::size_t>(input));
}

nlohmann::json options_json(const ProfilerOptions& o) {
  return {{"kind", salience_kind_name(o.kind)}, {"candidates", o.candidates}, {"fire_fraction", o.fire_fraction},
          {"early_stop", o.early_stop}, {"check_every", o.check_every}, {"min_sequences", o.min_sequences},
          {"rho", o.rho}, {"sample_per_linear", o.sample_per_linear}, {"seed", o.seed}};
}
}  // namespace

void Profiler::save(storage::H5File& f, Communicator& comm, const std::string& extra_json) const {
  const ModelConfig& c = model_.config();
  nlohmann::json profile = nlohmann::json::parse(extra_json.empty() ? "{}" : extra_json);
  profile["options"] = options_json(options_);
  nlohmann::json checks = nlohmann::json::array();
  for (const auto& ch : checks_) checks.push_back({{"sequences", ch.sequences}, {"rho", ch.rho}});
  profile["early_stop_checks"] = checks;
  profile["stopped_early"] = stopped_early_;
  profile["early_stop_last_check"] = last_check_;
  const bool rank0 = comm.rank() == 0;
  f.put_text("profile.json", broadcast_string(comm, profile.dump(2)), rank0);
  f.put_text("config.json", c.json_text, rank0);
  // The early-stop sample is global (identical on every rank): rank 0 writes it.
  f.create_dataset("early_stop_previous", at::kFloat, {previous_sample_.defined() ? previous_sample_.numel() : 0});
  // PQI rows per Linear: the same on every rank (or 0), agreed so that creation is collective.
  at::Tensor pqi_rows = at::tensor({has_pqi() ? stats_.front().pqi.size(0) : 0}, at::kLong);
  comm.all_reduce(pqi_rows, ReduceOp::kMax);
  const std::int64_t formats = pqi_rows.item<std::int64_t>();
  const auto shapes = linear_shapes(c);
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    for (int i = 0; i < kNumLinears; ++i) {
      const auto [out, in] = shapes[i];
      const std::int64_t k = std::min(out, options_.candidates);
      const std::string g = stats_group(l, i);
      for (const auto& [name, keep] : {std::pair{"grad_sum", options_.keep_grad_sum}, {"causal", options_.keep_causal},
                                       {"fisher", options_.keep_fisher}})
        if (keep) f.create_dataset(g + name, at::kFloat, {out, in});
      f.create_dataset(g + "out_grad_sq", at::kDouble, {out});
      f.create_dataset(g + "causal_rows", at::kDouble, {out});
      f.create_dataset(g + "input_abs_sum", at::kDouble, {in});
      f.create_dataset(g + "counters", at::kLong, {4});  // tokens, micro_batches, coact tokens, coact started
      f.create_dataset(g + "candidates", at::kLong, {k});
      f.create_dataset(g + "coact_counts", at::kLong, {k, k});
      f.create_dataset(g + "pqi", at::kDouble, {formats, out});
    }
    for (int k = 0; k < kNumInputs; ++k) {
      const std::int64_t in = shapes[static_cast<std::size_t>(kFirstReader[k])].second;
      f.create_dataset(hessian_name(l, k), at::kFloat, {in, in});
      f.create_dataset(hessian_name(l, k) + "_tokens", at::kLong, {1});
    }
  }
  if (rank0 && previous_sample_.defined()) f.write("early_stop_previous", previous_sample_);
  for (const auto& st : stats_) {
    const std::string g = stats_group(st.layer, st.linear);
    if (st.grad_sum.defined()) f.write(g + "grad_sum", st.grad_sum);
    if (st.causal.defined()) f.write(g + "causal", st.causal);
    if (st.fisher.defined()) f.write(g + "fisher", st.fisher);
    f.write(g + "out_grad_sq", st.out_grad_sq);
    f.write(g + "causal_rows", st.causal_rows);
    f.write(g + "input_abs_sum", st.input_abs_sum);
    f.write(g + "counters", at::tensor({st.tokens, st.micro_batches, st.coact.tokens(),
                                        static_cast<std::int64_t>(st.coact.started())}, at::kLong));
    const std::int64_t k = std::min(st.coact.channels(), options_.candidates);
    f.write(g + "candidates", st.coact.started() ? st.coact.candidates() : at::zeros({k}, at::kLong));
    f.write(g + "coact_counts", st.coact.started() ? st.coact.counts() : at::zeros({k, k}, at::kLong));
    if (formats > 0) f.write(g + "pqi", st.pqi);
  }
  for (const DecoderLayer& layer : model_.decoder())
    for (int k = 0; k < kNumInputs; ++k) {
      // Made here and dropped at once (not kept as the last one read, mid-calibration).
      const std::size_t h = hessian_index(layer.index, k);
      f.write(hessian_name(layer.index, k), h == full_index_ ? full_ : hessian_[h].full());
      f.write(hessian_name(layer.index, k) + "_tokens", at::tensor({hessian_tokens(layer.index, k)}, at::kLong));
    }
}

void Profiler::load(const storage::H5File& f) {
  CSAQ_CHECK(f.exists("profile.json") && f.exists("stats"), "'", f.path(), "' is not a csaq salience file");
  CSAQ_CHECK(f.read_text("config.json") == model_.config().json_text, "salience file '", f.path(),
             "' was computed for a different model (its config.json differs)");
  CSAQ_CHECK(f.exists(hessian_name(model_.layers().begin, 0)), "salience file '", f.path(),
             "' was written by an older csaq (no input Hessians); profile again");
  const auto profile = nlohmann::json::parse(f.read_text("profile.json"));
  const auto saved = profile["options"];
  const auto mine = options_json(options_);
  for (const char* key : {"candidates", "fire_fraction"})
    CSAQ_CHECK(saved[key] == mine[key], "salience file '", f.path(), "' was made with ", key, " ", saved[key].dump(),
               ", not ", mine[key].dump());
  full_ = at::Tensor();
  full_index_ = kNoHessian;
  for (auto& st : stats_) {
    const std::string g = stats_group(st.layer, st.linear);
    // Each accumulator the file holds (it keeps those of the cost model it was profiled for).
    st.grad_sum = f.exists(g + "grad_sum") ? f.read(g + "grad_sum") : at::Tensor();
    st.causal = f.exists(g + "causal") ? f.read(g + "causal") : at::Tensor();
    st.fisher = f.exists(g + "fisher") ? f.read(g + "fisher") : at::Tensor();
    st.out_grad_sq = f.read(g + "out_grad_sq");
    st.causal_rows = f.exists(g + "causal_rows") ? f.read(g + "causal_rows")
                     : st.causal.defined()        ? st.causal.sum(1, /*keepdim=*/false, at::kDouble)
                                                  : at::zeros_like(st.out_grad_sq);
    st.input_abs_sum = f.read(g + "input_abs_sum");
    const at::Tensor counters = f.read(g + "counters");
    st.tokens = counters[0].item<std::int64_t>();
    st.micro_batches = counters[1].item<std::int64_t>();
    if (counters[3].item<std::int64_t>() != 0)
      st.coact.restore(f.read(g + "candidates"), f.read(g + "coact_counts"), counters[2].item<std::int64_t>());
    const at::Tensor pqi = f.read(g + "pqi");
    st.pqi = pqi.size(0) > 0 ? pqi : at::Tensor();
  }
  for (const DecoderLayer& layer : model_.decoder())
    for (int k = 0; k < kNumInputs; ++k) {
      const std::size_t h = hessian_index(layer.index, k);
      const at::Tensor full = f.read(hessian_name(layer.index, k));
      if (!hessian_[h].defined()) hessian_[h] = GramMatrix(full.size(0));
      hessian_[h].assign(full);
      hessian_tokens_[h] = f.read(hessian_name(layer.index, k) + "_tokens")[0].item<std::int64_t>();
    }
  checks_.clear();
  for (const auto& ch : profile["early_stop_checks"]) checks_.push_back({ch["sequences"], ch["rho"]});
  stopped_early_ = profile["stopped_early"];
  last_check_ = profile.value("early_stop_last_check", std::int64_t{0});
  const at::Tensor previous = f.exists("early_stop_previous") ? f.read("early_stop_previous") : at::Tensor();
  previous_sample_ = previous.defined() && previous.numel() > 0 ? previous : at::Tensor();
}

double spearman(const at::Tensor& a, const at::Tensor& b) {
  auto ranks = [](const at::Tensor& v) {
    const at::Tensor order = std::get<1>(at::sort(v.to(at::kDouble), /*stable=*/true, 0, false));
    at::Tensor r = at::empty_like(order, at::kDouble);
    r.index_put_({order}, at::arange(v.numel(), at::kDouble));
    return r;
  };
  const at::Tensor ra = ranks(a), rb = ranks(b);
  const at::Tensor da = ra - ra.mean(), db = rb - rb.mean();
  const double denom = std::sqrt((da * da).sum().item<double>() * (db * db).sum().item<double>());
  return denom > 0 ? (da * db).sum().item<double>() / denom : 1.0;
}

}  // namespace csaq

namespace csaq {
namespace {

// Calls fn(layer, linear, begin, end) for blocks of at most `chunk` weights (whole rows) of
// every Linear on this rank, so no pass holds more than one block's temporaries.
template <typename Fn>
void for_each_row_block(const Profiler& p, std::int64_t chunk, Fn fn) {
  for (const auto& s : p.stats()) {
    const at::Tensor& w = p.weights(s.layer, s.linear).weight;
    const std::int64_t out = w.size(0), rows = std::max<std::int64_t>(1, chunk / std::max<std::int64_t>(1, w.size(1)));
    for (std::int64_t r = 0; r < out; r += rows) fn(s.layer, s.linear, r, std::min(out, r + rows));
  }
}

// Bit patterns of non-negative float32 values (sign bit cleared) order like the values.
at::Tensor float_bits(const at::Tensor& v) {
  return at::bitwise_and(v.contiguous().view(at::kInt).reshape({-1}), 0x7FFFFFFF);
}

float float_of_bits(std::int64_t bits) {
  const auto u = static_cast<std::uint32_t>(bits);
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The smallest float32 t such that at most `fraction` of all salience values of `kind` (all
// ranks) are >= t. Exact radix selection on the bit patterns in two passes: an all-reduced
// histogram of the high 16 bits finds the bin the cut falls in, a second one of the low 16
// bits inside that bin finds the cut.
float global_top_threshold(const Profiler& p, SalienceKind kind, double fraction, std::int64_t chunk,
                           Communicator& comm) {
  at::Tensor high = at::zeros({1 << 15}, at::kLong);
  for_each_row_block(p, chunk, [&](std::int64_t l, int i, std::int64_t b, std::int64_t e) {
    high += at::bincount(at::bitwise_right_shift(float_bits(p.salience_rows(l, i, kind, b, e)), 16), {}, 1 << 15);
  });
  comm.all_reduce(high, ReduceOp::kSum);
  // above[h] = values in bins >= h.
  const at::Tensor above = high.flip(0).cumsum(0).flip(0);
  const double wanted = fraction * static_cast<double>(above[0].item<std::int64_t>());
  const at::Tensor over = (above.to(at::kDouble) > wanted).nonzero();
  if (over.numel() == 0) return 0.0f;  // every value is within the fraction
  const std::int64_t bin = over.max().item<std::int64_t>();
  const std::int64_t above_bin = bin + 1 < (1 << 15) ? above[bin + 1].item<std::int64_t>() : 0;
  at::Tensor low = at::zeros({1 << 16}, at::kLong);
  for_each_row_block(p, chunk, [&](std::int64_t l, int i, std::int64_t b, std::int64_t e) {
    const at::Tensor bits = float_bits(p.salience_rows(l, i, kind, b, e));
    low += at::bincount(at::bitwise_and(bits.masked_select(at::bitwise_right_shift(bits, 16) == bin), 0xFFFF), {},
                        1 << 16);
  });
  comm.all_reduce(low, ReduceOp::kSum);
  const at::Tensor at_or_above = low.flip(0).cumsum(0).flip(0) + above_bin;
  const std::int64_t last = (at_or_above.to(at::kDouble) > wanted).nonzero().max().item<std::int64_t>();
  return float_of_bits((bin << 16 | last) + 1);
}

}  // namespace

double top_fraction_agreement(const Profiler& profiler, SalienceKind a, SalienceKind b, double fraction,
                              Communicator& comm, std::int64_t chunk) {
  const float ta = global_top_threshold(profiler, a, fraction, chunk, comm);
  const float tb = global_top_threshold(profiler, b, fraction, chunk, comm);
  at::Tensor counts = at::zeros({2}, at::kLong);
  for_each_row_block(profiler, chunk, [&](std::int64_t l, int i, std::int64_t begin, std::int64_t end) {
    const at::Tensor top_a = profiler.salience_rows(l, i, a, begin, end) >= ta;
    counts[0] += top_a.sum();
    counts[1] += at::logical_and(top_a, profiler.salience_rows(l, i, b, begin, end) >= tb).sum();
  });
  comm.all_reduce(counts, ReduceOp::kSum);
  return counts[0].item<std::int64_t>() ? double(counts[1].item<std::int64_t>()) / double(counts[0].item<std::int64_t>()) : 0.0;
}

}  // namespace csaq
