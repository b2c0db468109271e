#include "csaq/shard/model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <limits>
#include <set>

#include "csaq/storage/error.h"
#include "csaq/storage/safetensors.h"

namespace csaq {

const std::array<const char*, kNumLinears> kLinearNames = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};

namespace {

constexpr const char* kEmbed = kEmbedName;
constexpr const char* kLmHead = kLmHeadName;
constexpr const char* kFinalNorm = kFinalNormName;

std::string layer_prefix(std::int64_t layer) { return "model.layers." + std::to_string(layer) + "."; }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor var = xf.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (xf * at::rsqrt(var + eps)).to(x.scalar_type());
}

at::Tensor rotate_half(const at::Tensor& x) {
  const std::int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

at::Tensor inverse_frequencies(const RopeConfig& rope, std::int64_t head_dim) {
  at::Tensor exponent = at::arange(0, head_dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(head_dim);
  at::Tensor inv = at::reciprocal(at::pow(rope.theta, exponent));
  if (rope.type == "linear") return inv / rope.factor;
  if (rope.type != "llama3") return inv;
  // Llama 3.1 frequency-dependent scaling, as transformers' _compute_llama3_parameters.
  const double old_len = static_cast<double>(rope.original_max_position_embeddings);
  const double low_wavelen = old_len / rope.low_freq_factor;
  const double high_wavelen = old_len / rope.high_freq_factor;
  at::Tensor wavelen = at::reciprocal(inv) * (2 * M_PI);
  at::Tensor scaled = at::where(wavelen > low_wavelen, inv / rope.factor, inv);
  at::Tensor smooth = (at::reciprocal(wavelen) * old_len - rope.low_freq_factor) /
                      (rope.high_freq_factor - rope.low_freq_factor);
  at::Tensor smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled;
  at::Tensor medium = at::logical_not(wavelen < high_wavelen).logical_and(at::logical_not(wavelen > low_wavelen));
  return at::where(medium, smoothed, scaled);
}

}  // namespace

std::string hf_linear_name(std::int64_t layer, int linear, const char* param) {
  return layer_prefix(layer) + kLinearNames.at(linear) + "." + param;
}

std::array<std::pair<std::int64_t, std::int64_t>, kNumLinears> linear_shapes(const ModelConfig& c) {
  const std::int64_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  const std::int64_t h = c.hidden_size, i = c.intermediate_size;
  return {{{q, h}, {kv, h}, {kv, h}, {h, q}, {i, h}, {i, h}, {h, i}}};
}

bool linear_has_bias(const ModelConfig& c, int linear) {
  if (linear <= 2) return c.qkv_bias;
  if (linear == 3) return c.o_bias;
  return c.mlp_bias;
}

std::string hf_layer_name(std::int64_t layer, const char* rest) { return layer_prefix(layer) + rest; }

std::uint64_t layer_parameters(const ModelConfig& c) {
  std::uint64_t n = 2 * static_cast<std::uint64_t>(c.hidden_size);  // two norms
  const auto shapes = linear_shapes(c);
  for (int i = 0; i < kNumLinears; ++i)
    n += static_cast<std::uint64_t>(shapes[i].first) *
         (static_cast<std::uint64_t>(shapes[i].second) + (linear_has_bias(c, i) ? 1 : 0));
  return n;
}

std::vector<LayerRange> partition_layers(const std::vector<std::uint64_t>& cost,
                                         std::uint64_t first_extra, std::uint64_t last_extra,
                                         int world) {
  const auto n = static_cast<std::int64_t>(cost.size());
  CSAQ_CHECK(world >= 1 && world <= n, "cannot split ", n, " decoder layers across ", world,
             " ranks: use between 1 and ", n, " ranks");
  std::vector<std::uint64_t> prefix(n + 1, 0);
  for (std::int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost[i];
  auto load = [&](int rank, std::int64_t a, std::int64_t b) {
    return prefix[b] - prefix[a] + (rank == 0 ? first_extra : 0) + (rank == world - 1 ? last_extra : 0);
  };
  constexpr std::uint64_t kInf = std::numeric_limits<std::uint64_t>::max();
  // best[r][i]: smallest possible maximum load placing layers [0, i) on ranks [0, r].
  std::vector<std::vector<std::uint64_t>> best(world, std::vector<std::uint64_t>(n + 1, kInf));
  for (std::int64_t i = 1; i <= n; ++i) best[0][i] = load(0, 0, i);
  for (int r = 1; r < world; ++r)
    for (std::int64_t i = r + 1; i <= n; ++i)
      for (std::int64_t a = r; a < i; ++a)
        if (best[r - 1][a] != kInf) best[r][i] = std::min(best[r][i], std::max(best[r - 1][a], load(r, a, i)));
  const std::uint64_t limit = best[world - 1][n];
  // Among the partitions whose every rank stays within that maximum, the most even one: the
  // smallest sum of squared loads (so that ranks the maximum does not constrain, between a
  // heavy first and last rank, share the layers evenly).
  constexpr long double kNone = std::numeric_limits<long double>::infinity();
  std::vector<std::vector<long double>> squares(world, std::vector<long double>(n + 1, kNone));
  std::vector<std::vector<std::int64_t>> split(world, std::vector<std::int64_t>(n + 1, 0));
  auto square = [](std::uint64_t v) { return static_cast<long double>(v) * static_cast<long double>(v); };
  for (std::int64_t i = 1; i <= n; ++i)
    if (load(0, 0, i) <= limit) squares[0][i] = square(load(0, 0, i));
  for (int r = 1; r < world; ++r) {
    for (std::int64_t i = r + 1; i <= n; ++i) {
      for (std::int64_t a = r; a < i; ++a) {
        const std::uint64_t l = load(r, a, i);
        if (squares[r - 1][a] == kNone || l > limit) continue;
        const long double v = squares[r - 1][a] + square(l);
        if (v < squares[r][i]) {
          squares[r][i] = v;
          split[r][i] = a;
        }
      }
    }
  }
  std::vector<LayerRange> ranges(world);
  std::int64_t end = n;
  for (int r = world - 1; r >= 0; --r) {
    const std::int64_t begin = r == 0 ? 0 : split[r][end];
    ranges[r] = {begin, end};
    end = begin;
  }
  return ranges;
}

std::vector<LayerRange> partition_model(const ModelConfig& c, int world) {
  const std::uint64_t vh = static_cast<std::uint64_t>(c.vocab_size) * c.hidden_size;
  return partition_layers(std::vector<std::uint64_t>(c.num_layers, layer_parameters(c)), vh,
                          vh + c.hidden_size, world);
}

PositionTables position_tables(const ModelConfig& c, std::int64_t seq_len, at::ScalarType dtype) {
  CSAQ_CHECK(!c.sliding_window || seq_len <= *c.sliding_window, "sequence length ", seq_len,
             " exceeds the model's sliding_window (", *c.sliding_window,
             "); sliding-window attention is not supported: use --seq-len <= ",
             c.sliding_window.value_or(0));
  at::Tensor inv = inverse_frequencies(c.rope, c.head_dim);
  at::Tensor freqs = at::outer(at::arange(seq_len, at::kLong).to(at::kFloat), inv);
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  PositionTables t;
  t.cos = emb.cos().to(dtype);
  t.sin = emb.sin().to(dtype);
  t.mask = at::ones({seq_len, seq_len}, at::kBool).triu(1);
  return t;
}

ModelShard::ModelShard(ModelConfig config, int rank, int world, const TensorSource& source,
                       at::ScalarType dtype)
    : config_(std::move(config)), rank_(rank), world_(world), dtype_(dtype) {
  partition_ = partition_model(config_, world_);
  CSAQ_CHECK(rank_ >= 0 && rank_ < world_, "rank ", rank_, " outside world of ", world_);
  range_ = partition_[rank_];
  const ModelConfig& c = config_;

  auto fetch = [&](const std::string& name, std::vector<std::int64_t> shape) {
    at::Tensor t = source.get(name);
    CSAQ_CHECK(t.defined(), "tensor '", name, "' is missing from ", source.where(name),
               " (rank ", rank_, " needs it)");
    CSAQ_CHECK(at::isFloatingType(t.scalar_type()), "tensor '", name, "' in ", source.where(name),
               " has dtype ", c10::toString(t.scalar_type()), "; weights must be floating point");
    CSAQ_CHECK(t.sizes().vec() == shape, "tensor '", name, "' in ", source.where(name),
               " has shape ", shape_str(t.sizes()), " but config.json implies ", shape_str(shape));
    // A NaN or infinity would flow into every statistic and every quantized value.
    CSAQ_CHECK(at::isfinite(t).all().item<bool>(), "tensor '", name, "' in ", source.where(name), " holds ",
               (~at::isfinite(t)).sum().item<std::int64_t>(), " values that are NaN or infinite");
    return t.to(dtype_, /*non_blocking=*/false, /*copy=*/true);
  };
  auto fetch_either = [&](const char* primary, const char* tied_alternative) {
    const bool have = source.get(primary).defined();
    const char* name = have || !c.tie_word_embeddings ? primary : tied_alternative;
    return fetch(name, {c.vocab_size, c.hidden_size});
  };

  if (is_first()) embed_tokens_ = fetch_either(kEmbed, kLmHead);
  if (is_last()) {
    final_norm_ = fetch(kFinalNorm, {c.hidden_size});
    lm_head_ = fetch_either(kLmHead, kEmbed);
  }
  const auto shapes = linear_shapes(c);
  for (std::int64_t l = range_.begin; l < range_.end; ++l) {
    DecoderLayer layer;
    layer.index = l;
    layer.input_norm = fetch(layer_prefix(l) + "input_layernorm.weight", {c.hidden_size});
    layer.post_attention_norm = fetch(layer_prefix(l) + "post_attention_layernorm.weight", {c.hidden_size});
    for (int i = 0; i < kNumLinears; ++i) {
      layer.linears[i].weight =
          fetch(hf_linear_name(l, i), {shapes[i].first, shapes[i].second}).requires_grad_(true);
      if (linear_has_bias(c, i)) layer.linears[i].bias = fetch(hf_linear_name(l, i, "bias"), {shapes[i].first});
    }
    decoder_.push_back(std::move(layer));
  }
}

void ModelShard::set_linear_weight(std::int64_t layer, int linear, const at::Tensor& values) {
  CSAQ_ASSERT(range_.contains(layer), "layer ", layer, " is not on rank ", rank_);
  at::NoGradGuard no_grad;
  decoder_[static_cast<std::size_t>(layer - range_.begin)].linears[linear].weight.copy_(values);
}

at::Tensor ModelShard::embed(const at::Tensor& ids) const {
  CSAQ_ASSERT(is_first(), "embed() on rank ", rank_);
  return at::embedding(embed_tokens_, ids);
}

at::Tensor ModelShard::layer_forward(std::size_t local, const at::Tensor& x, const PositionTables& pos,
                                     const LinearObserver* observer) const {
  const DecoderLayer& layer = decoder_.at(local);
  const ModelConfig& c = config_;
  auto linear = [&](int i, const at::Tensor& in) {
    at::Tensor out = at::linear(in, layer.linears[i].weight, layer.linears[i].bias);
    if (observer != nullptr) (*observer)(layer.index, i, in, out);
    return out;
  };
  const std::int64_t b = x.size(0), len = x.size(1);
  at::Tensor h = rms_norm(x, layer.input_norm, c.rms_norm_eps);
  at::Tensor q = linear(0, h).view({b, len, c.num_heads, c.head_dim}).transpose(1, 2);
  at::Tensor k = linear(1, h).view({b, len, c.num_kv_heads, c.head_dim}).transpose(1, 2);
  at::Tensor v = linear(2, h).view({b, len, c.num_kv_heads, c.head_dim}).transpose(1, 2);
  q = q * pos.cos + rotate_half(q) * pos.sin;
  k = k * pos.cos + rotate_half(k) * pos.sin;
  if (c.num_kv_heads != c.num_heads) {
    const std::int64_t rep = c.num_heads / c.num_kv_heads;
    k = k.repeat_interleave(rep, 1);
    v = v.repeat_interleave(rep, 1);
  }
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(static_cast<double>(c.head_dim)));
  scores = scores.masked_fill(pos.mask, -std::numeric_limits<double>::infinity());
  at::Tensor probs = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
  at::Tensor attn = at::matmul(probs, v).transpose(1, 2).reshape({b, len, c.num_heads * c.head_dim});
  at::Tensor hidden = x + linear(3, attn);
  at::Tensor h2 = rms_norm(hidden, layer.post_attention_norm, c.rms_norm_eps);
  at::Tensor act = at::silu(linear(4, h2)) * linear(5, h2);
  return hidden + linear(6, act);
}

at::Tensor ModelShard::head(const at::Tensor& x) const {
  CSAQ_ASSERT(is_last(), "head() on rank ", rank_);
  return at::linear(rms_norm(x, final_norm_, config_.rms_norm_eps), lm_head_).to(at::kFloat);
}

at::Tensor next_token_nll_sum(const at::Tensor& logits, const at::Tensor& ids) {
  const std::int64_t len = logits.size(1), vocab = logits.size(2);
  at::Tensor pred = logits.slice(1, 0, len - 1).reshape({-1, vocab});
  at::Tensor target = ids.slice(1, 1).reshape({-1});
  return at::nll_loss(at::log_softmax(pred, -1), target, {}, at::Reduction::Sum);
}

at::Tensor sample_next_tokens(const at::Tensor& logits, const at::Tensor& ids, std::uint64_t seed) {
  const std::int64_t batch = logits.size(0), len = logits.size(1), vocab = logits.size(2);
  const std::int64_t rows = batch * (len - 1);
  const at::Tensor pred = logits.detach().slice(1, 0, len - 1).reshape({-1, vocab}).to(at::kCPU);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const at::Tensor u = at::rand({rows}, gen, at::TensorOptions().dtype(at::kDouble));
  at::Tensor drawn = at::empty({rows}, at::kLong);
  // Blocks of positions whose float64 cumulative sums take about 64 MiB.
  const std::int64_t block = std::max<std::int64_t>(1, (std::int64_t{8} << 20) / std::max<std::int64_t>(1, vocab));
  for (std::int64_t r = 0; r < rows; r += block) {
    const std::int64_t e = std::min(rows, r + block);
    const at::Tensor cdf = at::softmax(pred.slice(0, r, e).to(at::kDouble), -1).cumsum(-1);
    // The first token whose cumulative probability exceeds u (scaled by the row's sum, which
    // rounding leaves a hair off 1); zero-probability tokens are never drawn.
    const at::Tensor target = (u.slice(0, r, e) * cdf.select(1, vocab - 1)).unsqueeze(1);
    drawn.slice(0, r, e).copy_(at::searchsorted(cdf, target, /*out_int32=*/false, /*right=*/true).squeeze(1));
  }
  drawn.clamp_max_(vocab - 1);
  return at::cat({ids.slice(1, 0, 1).to(at::kCPU), drawn.reshape({batch, len - 1})}, 1).to(ids.device());
}

Divergence next_token_divergence(const at::Tensor& reference_logits, const at::Tensor& logits) {
  CSAQ_CHECK(reference_logits.sizes() == logits.sizes(), "reference logits ", reference_logits.sizes(),
             " and evaluated logits ", logits.sizes(), " differ in shape");
  const std::int64_t len = logits.size(1), vocab = logits.size(2);
  const at::Tensor ref = at::log_softmax(reference_logits.slice(1, 0, len - 1).reshape({-1, vocab}).to(at::kFloat), -1);
  const at::Tensor lp = at::log_softmax(logits.slice(1, 0, len - 1).reshape({-1, vocab}).to(at::kFloat), -1);
  Divergence d;
  // Σ_v p_ref (log p_ref - log p), each position's sum in float64.
  d.kl_sum = (ref.exp() * (ref - lp)).sum(-1, /*keepdim=*/false, at::kDouble).sum().item<double>();
  d.top1_agree = (ref.argmax(-1) == lp.argmax(-1)).sum().item<std::int64_t>();
  return d;
}

namespace {
// See load_model_config.
std::vector<std::string> check_weights_against_config(const ModelConfig& c, const storage::SafetensorsReader& reader,
                                                      const std::string& model_dir) {
  std::set<std::string> expected{kEmbed, kLmHead, kFinalNorm};
  std::int64_t held = 0;  // decoder layers the files hold: 1 + the largest index named
  std::string example;
  const std::string prefix = "model.layers.";
  for (const auto& name : reader.names()) {
    if (name.rfind(prefix, 0) != 0) continue;
    const std::size_t end = name.find('.', prefix.size());
    const std::string digits = name.substr(prefix.size(), end == std::string::npos ? std::string::npos : end - prefix.size());
    if (digits.empty() || digits.size() > 12 || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::int64_t layer = std::stoll(digits);
    if (layer + 1 > held) {
      held = layer + 1;
      example = name;
    }
  }
  CSAQ_CHECK(held <= c.num_layers, "config.json of '", model_dir, "' has num_hidden_layers ", c.num_layers,
             " but its safetensors files hold ", held, " decoder layers ('", example,
             "'); csaq would leave layers out: fix config.json");
  CSAQ_CHECK(held >= c.num_layers, "config.json of '", model_dir, "' has num_hidden_layers ", c.num_layers,
             " but its safetensors files hold ", held, " decoder layers",
             held > 0 ? " (the last is '" + example + "')" : std::string(), ": fix config.json or the weights");
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    expected.insert(layer_prefix(l) + "input_layernorm.weight");
    expected.insert(layer_prefix(l) + "post_attention_layernorm.weight");
    for (int i = 0; i < kNumLinears; ++i) {
      expected.insert(hf_linear_name(l, i));
      if (linear_has_bias(c, i)) expected.insert(hf_linear_name(l, i, "bias"));
    }
  }
  std::vector<std::string> unused;
  for (const auto& name : reader.names())
    if (expected.count(name) == 0) unused.push_back(name);
  return unused;
}
}  // namespace

ModelConfig load_model_config(const std::string& model_dir, std::vector<std::string>* unused) {
  ModelConfig config = ModelConfig::load(model_dir);
  const auto reader = storage::SafetensorsReader::open(model_dir);
  const auto extra = check_weights_against_config(config, reader, model_dir);
  if (unused != nullptr) *unused = extra;
  return config;
}

ModelShard load_model_shard(const std::string& model_dir, int rank, int world, at::ScalarType dtype) {
  ModelConfig config = ModelConfig::load(model_dir);
  auto reader = std::make_shared<storage::SafetensorsReader>(storage::SafetensorsReader::open(model_dir));
  check_weights_against_config(config, *reader, model_dir);
  TensorSource source{
      [reader](const std::string& name) {
        return reader->contains(name) ? reader->load(name) : at::Tensor();
      },
      [reader, model_dir](const std::string& name) {
        return reader->contains(name) ? "'" + reader->file_of(name) + "'"
                                      : "the safetensors files of '" + model_dir + "'";
      }};
  return ModelShard(std::move(config), rank, world, source, dtype);
}

TensorSource map_source(const std::map<std::string, at::Tensor>& tensors, std::string label) {
  return {[&tensors](const std::string& name) {
            auto it = tensors.find(name);
            return it == tensors.end() ? at::Tensor() : it->second;
          },
          [label](const std::string&) { return label; }};
}

std::vector<std::pair<std::string, at::Tensor>> random_model_weights(const ModelConfig& c,
                                                                     std::uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto normal = [&](std::vector<std::int64_t> shape, double std) {
    return at::randn(shape, gen, at::kFloat) * std;
  };
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.emplace_back(kEmbed, normal({c.vocab_size, c.hidden_size}, 1.0));
  const auto shapes = linear_shapes(c);
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    out.emplace_back(layer_prefix(l) + "input_layernorm.weight", 1.0 + normal({c.hidden_size}, 0.1));
    out.emplace_back(layer_prefix(l) + "post_attention_layernorm.weight", 1.0 + normal({c.hidden_size}, 0.1));
    for (int i = 0; i < kNumLinears; ++i) {
      const auto [rows, cols] = shapes[i];
      out.emplace_back(hf_linear_name(l, i), normal({rows, cols}, 1.0 / std::sqrt(static_cast<double>(cols))));
      if (linear_has_bias(c, i)) out.emplace_back(hf_linear_name(l, i, "bias"), normal({rows}, 0.05));
    }
  }
  out.emplace_back(kFinalNorm, 1.0 + normal({c.hidden_size}, 0.1));
  if (!c.tie_word_embeddings)
    out.emplace_back(kLmHead, normal({c.vocab_size, c.hidden_size}, 1.0 / std::sqrt(static_cast<double>(c.hidden_size))));
  return out;
}

}  // namespace csaq
