#include "csaq/shard/config.h"

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "csaq/storage/error.h"
#include "csaq/storage/files.h"

namespace csaq {
using nlohmann::json;

namespace {

constexpr const char* kSupportedTypes = "llama, mistral, qwen2";

class Keys {
 public:
  Keys(const json& j, std::string source) : j_(j), source_(std::move(source)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }

  std::int64_t positive_int(const char* key) const {
    CSAQ_CHECK(has(key), source_, ": missing required key '", key, "'");
    return positive_int_value(j_[key], key);
  }
  std::int64_t positive_int_value(const json& v, const std::string& key) const {
    CSAQ_CHECK(v.is_number_integer() && v.get<std::int64_t>() > 0, source_, ": key '", key,
               "' must be a positive integer, got ", v.dump());
    return v.get<std::int64_t>();
  }
  double number(const json& obj, const char* key, const std::string& path) const {
    CSAQ_CHECK(obj.contains(key) && !obj[key].is_null(), source_, ": missing required key '",
               path, "'");
    CSAQ_CHECK(obj[key].is_number(), source_, ": key '", path, "' must be a number, got ",
               obj[key].dump());
    return obj[key].get<double>();
  }
  bool boolean(const char* key, bool absent) const {
    if (!has(key)) return absent;
    CSAQ_CHECK(j_[key].is_boolean(), source_, ": key '", key, "' must be true or false, got ",
               j_[key].dump());
    return j_[key].get<bool>();
  }
  const std::string& source() const { return source_; }

 private:
  const json& j_;
  std::string source_;
};

RopeConfig parse_rope(const json& j, const Keys& keys) {
  RopeConfig rope;
  // transformers >= 5 writes "rope_parameters": {"rope_theta", "rope_type", ...}; older
  // checkpoints a top-level "rope_theta" and an optional "rope_scaling" object.
  const json* scaling = nullptr;
  std::string scaling_key;
  if (keys.has("rope_parameters")) {
    const json& p = j["rope_parameters"];
    CSAQ_CHECK(p.is_object(), keys.source(), ": 'rope_parameters' must be an object");
    rope.theta = keys.number(p, "rope_theta", "rope_parameters.rope_theta");
    scaling = &p;
    scaling_key = "rope_parameters";
  } else {
    CSAQ_CHECK(keys.has("rope_theta"), keys.source(),
               ": missing required key 'rope_theta' (or 'rope_parameters.rope_theta')");
    rope.theta = keys.number(j, "rope_theta", "rope_theta");
    if (keys.has("rope_scaling")) {
      CSAQ_CHECK(j["rope_scaling"].is_object(), keys.source(), ": 'rope_scaling' must be an object or null");
      scaling = &j["rope_scaling"];
      scaling_key = "rope_scaling";
    }
  }
  CSAQ_CHECK(rope.theta > 0 && std::isfinite(rope.theta), keys.source(), ": rope_theta must be a positive number");
  if (scaling == nullptr) return rope;

  const json& s = *scaling;
  std::string type = "default";
  if (s.contains("rope_type") && !s["rope_type"].is_null()) {
    CSAQ_CHECK(s["rope_type"].is_string(), keys.source(), ": '", scaling_key, ".rope_type' must be a string, got ",
               s["rope_type"].dump());
    type = s["rope_type"].get<std::string>();
  } else if (s.contains("type") && !s["type"].is_null()) {
    CSAQ_CHECK(s["type"].is_string(), keys.source(), ": '", scaling_key, ".type' must be a string, got ",
               s["type"].dump());
    type = s["type"].get<std::string>();
  } else {
    CSAQ_CHECK(scaling_key == "rope_parameters", keys.source(),
               ": 'rope_scaling' has neither 'rope_type' nor 'type'");
  }
  rope.type = type;
  if (type == "default") return rope;
  // Scaling factors divide frequencies: they must be positive and finite.
  auto factor = [&](const char* key) {
    const double v = keys.number(s, key, scaling_key + "." + key);
    CSAQ_CHECK(v > 0 && std::isfinite(v), keys.source(), ": '", scaling_key, ".", key,
               "' must be a positive number, got ", s[key].dump());
    return v;
  };
  if (type == "linear") {
    rope.factor = factor("factor");
    return rope;
  }
  if (type == "llama3") {
    rope.factor = factor("factor");
    rope.low_freq_factor = factor("low_freq_factor");
    rope.high_freq_factor = factor("high_freq_factor");
    CSAQ_CHECK(s.contains("original_max_position_embeddings"), keys.source(),
               ": missing required key '", scaling_key, ".original_max_position_embeddings'");
    rope.original_max_position_embeddings = keys.positive_int_value(
        s["original_max_position_embeddings"], scaling_key + ".original_max_position_embeddings");
    CSAQ_CHECK(rope.high_freq_factor != rope.low_freq_factor, keys.source(), ": ", scaling_key,
               ": high_freq_factor must differ from low_freq_factor");
    return rope;
  }
  CSAQ_FAIL(keys.source(), ": unsupported RoPE type '", type, "' in '", scaling_key,
            "' (supported: default, linear, llama3)");
}

}  // namespace

ModelConfig ModelConfig::parse(const std::string& text, const std::string& source) try {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    CSAQ_FAIL(source, ": malformed JSON: ", e.what());
  }
  CSAQ_CHECK(j.is_object(), source, ": not a JSON object");
  Keys keys(j, source);
  ModelConfig c;
  c.json_text = text;
  CSAQ_CHECK(keys.has("model_type"), source, ": missing required key 'model_type'");
  CSAQ_CHECK(j["model_type"].is_string(), source, ": 'model_type' must be a string");
  c.model_type = j["model_type"].get<std::string>();
  CSAQ_CHECK(c.model_type == "llama" || c.model_type == "mistral" || c.model_type == "qwen2",
             source, ": unsupported model_type '", c.model_type, "' (supported: ",
             kSupportedTypes, ")");

  c.vocab_size = keys.positive_int("vocab_size");
  c.hidden_size = keys.positive_int("hidden_size");
  c.intermediate_size = keys.positive_int("intermediate_size");
  c.num_layers = keys.positive_int("num_hidden_layers");
  c.num_heads = keys.positive_int("num_attention_heads");
  // Hugging Face: an absent num_key_value_heads means multi-head attention.
  c.num_kv_heads = keys.has("num_key_value_heads") ? keys.positive_int("num_key_value_heads")
                                                    : c.num_heads;
  CSAQ_CHECK(c.num_heads % c.num_kv_heads == 0, source, ": num_attention_heads (", c.num_heads,
             ") is not a multiple of num_key_value_heads (", c.num_kv_heads, ")");
  if (keys.has("head_dim")) {
    c.head_dim = keys.positive_int("head_dim");
  } else {
    CSAQ_CHECK(c.hidden_size % c.num_heads == 0, source, ": no 'head_dim' and hidden_size (",
               c.hidden_size, ") is not a multiple of num_attention_heads (", c.num_heads, ")");
    c.head_dim = c.hidden_size / c.num_heads;
  }
  CSAQ_CHECK(c.head_dim % 2 == 0, source, ": head_dim ", c.head_dim, " must be even for RoPE");
  c.rms_norm_eps = keys.number(j, "rms_norm_eps", "rms_norm_eps");
  CSAQ_CHECK(c.rms_norm_eps > 0, source, ": rms_norm_eps must be positive");
  c.rope = parse_rope(j, keys);

  if (keys.has("hidden_act")) {
    CSAQ_CHECK(j["hidden_act"] == "silu", source, ": unsupported hidden_act ",
               j["hidden_act"].dump(), " (supported: \"silu\")");
  }
  for (const char* key : {"torch_dtype", "dtype"})
    CSAQ_CHECK(!keys.has(key) || j[key].is_string(), source, ": key '", key, "' must be a dtype name such as \"bfloat16\", got ",
               j[key].dump());
  c.tie_word_embeddings = keys.boolean("tie_word_embeddings", false);
  if (c.model_type == "llama") {
    const bool attention_bias = keys.boolean("attention_bias", false);
    c.qkv_bias = attention_bias;
    c.o_bias = attention_bias;
    c.mlp_bias = keys.boolean("mlp_bias", false);
  } else if (c.model_type == "qwen2") {
    c.qkv_bias = true;
    CSAQ_CHECK(!keys.boolean("use_sliding_window", false), source,
               ": 'use_sliding_window': true is not supported for qwen2");
  } else {  // mistral
    if (keys.has("sliding_window")) c.sliding_window = keys.positive_int("sliding_window");
  }
  if (keys.has("max_position_embeddings"))
    c.max_position_embeddings = keys.positive_int("max_position_embeddings");
  // Sizes whose products would overflow (every element count must fit in int64) are refused
  // here, before anything is allocated from them.
  const long double vh = static_cast<long double>(c.vocab_size) * c.hidden_size;
  const long double attn = static_cast<long double>(c.hidden_size) * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads);
  const long double mlp = 3.0L * c.hidden_size * c.intermediate_size;
  const long double total = 2 * vh + static_cast<long double>(c.num_layers) * (attn + mlp);
  CSAQ_CHECK(total < 4.0e18L, source, ": its sizes describe ", static_cast<double>(total),
             " parameters, more than any tensor index can hold; check vocab_size, hidden_size, intermediate_size, "
             "num_hidden_layers and the head counts");
  return c;
} catch (const json::exception& e) {  // a value of a type no check above expected
  CSAQ_FAIL(source, ": unexpected value: ", e.what());
}

ModelConfig ModelConfig::load(const std::string& model_dir) {
  const std::string path = (std::filesystem::path(model_dir) / "config.json").string();
  return parse(storage::read_text_file(path), path);
}

}  // namespace csaq
