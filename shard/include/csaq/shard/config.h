// The model description read from a Hugging Face config.json (model_type llama, mistral,
// qwen2). See docs/config.md for every key read, which are required and what an absent
// optional key means.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace csaq {

struct RopeConfig {
  std::string type = "default";  // "default", "linear" or "llama3"
  double theta = 0.0;
  double factor = 1.0;            // linear, llama3
  double low_freq_factor = 0.0;   // llama3
  double high_freq_factor = 0.0;  // llama3
  std::int64_t original_max_position_embeddings = 0;  // llama3
};

struct ModelConfig {
  std::string model_type;
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;
  double rms_norm_eps = 0.0;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // q/k/v projections carry a bias (qwen2, llama attention_bias)
  bool o_bias = false;    // o_proj carries a bias (llama attention_bias)
  bool mlp_bias = false;  // gate/up/down carry a bias (llama mlp_bias)
  std::optional<std::int64_t> sliding_window;  // mistral: attention window, when set
  std::int64_t max_position_embeddings = 0;    // 0 when absent
  std::string json_text;  // the config.json text as read, carried into outputs

  // Parses `text`; errors name `source` (the file) and the key at fault.
  static ModelConfig parse(const std::string& text, const std::string& source);
  // Reads <model_dir>/config.json.
  static ModelConfig load(const std::string& model_dir);
};

}  // namespace csaq
