// One rank's part of a decoder-only transformer (Llama / Mistral / Qwen2) in LibTorch.
//
// Layers are split across ranks in contiguous ranges balanced by parameter bytes; the first
// rank also holds the token embedding, the last the final norm and lm_head. The forward
// math follows Hugging Face transformers (float32 RMSNorm and softmax, rotate-half RoPE).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "csaq/shard/config.h"

namespace csaq {

// Half-open range [begin, end) of decoder layer indices.
struct LayerRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;
  std::int64_t size() const { return end - begin; }
  bool contains(std::int64_t layer) const { return layer >= begin && layer < end; }
};

// Contiguous ranges, one per rank, minimising the largest rank's total: layer_cost[i] per
// layer plus first_extra on rank 0 and last_extra on the last rank. Deterministic. Throws if
// there are more ranks than layers.
std::vector<LayerRange> partition_layers(const std::vector<std::uint64_t>& layer_cost,
                                         std::uint64_t first_extra, std::uint64_t last_extra,
                                         int world_size);

// The partition of `config`'s layers by parameter count over `world_size` ranks.
std::vector<LayerRange> partition_model(const ModelConfig& config, int world_size);

// Parameters of one decoder layer, of the embedding, and of final norm + lm_head.
std::uint64_t layer_parameters(const ModelConfig& config);

// The seven Linear modules of a decoder layer, in this order everywhere in the project.
inline constexpr int kNumLinears = 7;
extern const std::array<const char*, kNumLinears> kLinearNames;  // "self_attn.q_proj", ...

// [out, in] of each Linear of a decoder layer (kLinearNames order), and whether it has a bias.
std::array<std::pair<std::int64_t, std::int64_t>, kNumLinears> linear_shapes(const ModelConfig& config);
bool linear_has_bias(const ModelConfig& config, int linear);

// Hugging Face tensor names, e.g. hf_linear_name(3, 0) = "model.layers.3.self_attn.q_proj.weight".
std::string hf_linear_name(std::int64_t layer, int linear, const char* param = "weight");
std::string hf_layer_name(std::int64_t layer, const char* rest);  // "model.layers.<layer>.<rest>"
inline constexpr const char* kEmbedName = "model.embed_tokens.weight";
inline constexpr const char* kLmHeadName = "lm_head.weight";
inline constexpr const char* kFinalNormName = "model.norm.weight";

struct Linear {
  at::Tensor weight;  // [out, in]; a leaf that requires grad
  at::Tensor bias;    // [out] or undefined
};

struct DecoderLayer {
  std::int64_t index = 0;  // global layer index
  at::Tensor input_norm;
  at::Tensor post_attention_norm;
  std::array<Linear, kNumLinears> linears;
};

// What every layer needs for one sequence length: RoPE cos/sin [seq_len, head_dim] and the
// causal mask [seq_len, seq_len] (true where attention is forbidden). Throws when seq_len
// exceeds a configured sliding window (not supported).
struct PositionTables {
  at::Tensor cos;
  at::Tensor sin;
  at::Tensor mask;
};
PositionTables position_tables(const ModelConfig& config, std::int64_t seq_len,
                               at::ScalarType dtype);

// Sees every Linear's input and output during a forward pass (salience and co-activation
// statistics hook in here). `linear` indexes kLinearNames.
using LinearObserver = std::function<void(std::int64_t layer, int linear, const at::Tensor& input,
                                          const at::Tensor& output)>;

// Supplies tensors by Hugging Face name: `get` returns an undefined tensor when absent;
// `where` names the file holding a tensor (for messages).
struct TensorSource {
  std::function<at::Tensor(const std::string&)> get;
  std::function<std::string(const std::string&)> where;
};

class ModelShard {
 public:
  // Loads rank `rank`'s part of `config`'s model from `source`, converted to `dtype`.
  // Shapes and dtypes are checked against the config; errors name tensor and file.
  ModelShard(ModelConfig config, int rank, int world_size, const TensorSource& source,
             at::ScalarType dtype = at::kFloat);

  const ModelConfig& config() const { return config_; }
  int rank() const { return rank_; }
  int world_size() const { return world_; }
  LayerRange layers() const { return range_; }
  const std::vector<LayerRange>& partition() const { return partition_; }
  bool is_first() const { return rank_ == 0; }
  bool is_last() const { return rank_ == world_ - 1; }
  at::ScalarType dtype() const { return dtype_; }
  const std::vector<DecoderLayer>& decoder() const { return decoder_; }
  // First rank: the token embedding; last rank: final norm and lm_head (undefined elsewhere).
  const at::Tensor& embed_tokens() const { return embed_tokens_; }
  const at::Tensor& final_norm() const { return final_norm_; }
  const at::Tensor& lm_head() const { return lm_head_; }

  // Overwrites the values of decoder layer `layer`'s Linear `linear` weight (this rank's) in
  // place; it stays the same leaf tensor. For estimates that evaluate the model elsewhere.
  void set_linear_weight(std::int64_t layer, int linear, const at::Tensor& values);

  // First rank: token ids [b, L] -> hidden states [b, L, hidden].
  at::Tensor embed(const at::Tensor& ids) const;
  // Decoder layer `local` (0-based within this rank) on hidden states [b, L, hidden].
  at::Tensor layer_forward(std::size_t local, const at::Tensor& x, const PositionTables& pos,
                           const LinearObserver* observer = nullptr) const;
  // Last rank: final norm + lm_head -> float32 logits [b, L, vocab].
  at::Tensor head(const at::Tensor& x) const;

 private:
  ModelConfig config_;
  int rank_;
  int world_;
  at::ScalarType dtype_;
  std::vector<LayerRange> partition_;
  LayerRange range_;
  at::Tensor embed_tokens_;
  at::Tensor final_norm_;
  at::Tensor lm_head_;
  std::vector<DecoderLayer> decoder_;
};

// <model_dir>/config.json, checked against the tensor names in the headers of its
// safetensors files (no tensor is read) before anything is sized from it: the decoder layers
// the files hold must be exactly the config's (more would be silently dropped, fewer would
// fail late), named in the error. Tensors the config does not use otherwise (for example
// old checkpoints' rotary_emb.inv_freq) are left out of the model and listed in `unused`.
ModelConfig load_model_config(const std::string& model_dir, std::vector<std::string>* unused = nullptr);

// Loads from a Hugging Face model directory (config.json + safetensors, single or sharded),
// reading only the tensors this rank owns (config checked by load_model_config).
ModelShard load_model_shard(const std::string& model_dir, int rank, int world_size,
                            at::ScalarType dtype = at::kFloat);

// A source over an in-memory map (tests, generated models).
TensorSource map_source(const std::map<std::string, at::Tensor>& tensors, std::string label);

// Random weights with Hugging Face names for `config` (float32, std 1/sqrt(fan_in), norms
// near 1), deterministic in `seed`. With tied embeddings only model.embed_tokens.weight.
std::vector<std::pair<std::string, at::Tensor>> random_model_weights(const ModelConfig& config,
                                                                     std::uint64_t seed);

// Next-token cross-entropy of logits [b, L, V] against ids [b, L], summed over the b*(L-1)
// predicted positions (float32 result, differentiable).
at::Tensor next_token_nll_sum(const at::Tensor& logits, const at::Tensor& ids);

// Next-token labels drawn from the model's own predictive distribution, laid out as ids
// [b, L] are for next_token_nll_sum: position 0 is ids' own, position t >= 1 one draw from
// softmax(logits[:, t-1]). The gradient of next_token_nll_sum(logits, these) is an unbiased
// sample of the Fisher of the model's distribution (the Hessian of the KL divergence from it),
// where the text's labels give the empirical Fisher of the text. Deterministic in `seed` and
// the logits alone (inverse-CDF draws in float64, in blocks of positions, so memory stays
// at a block's vocabulary-wide sums).
at::Tensor sample_next_tokens(const at::Tensor& logits, const at::Tensor& ids, std::uint64_t seed);

// KL(P_ref || P) summed over the b*(L-1) predicted positions of two logits [b, L, V] (float64
// result), and how many of those positions have the same most likely token in both.
struct Divergence {
  double kl_sum = 0.0;
  std::int64_t top1_agree = 0;
};
Divergence next_token_divergence(const at::Tensor& reference_logits, const at::Tensor& logits);

}  // namespace csaq
