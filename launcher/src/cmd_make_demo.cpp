// csaq make-demo: a small random Llama-architecture checkpoint in Hugging Face format, with a
// byte-level tokenizer and generated English-like text (calib.txt, heldout.txt) plus its token
// ids (tokens.npy), so that every command can be tried on a fresh machine without downloads.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "csaq/packer/checkpoint.h"
#include "csaq/shard/model.h"
#include "csaq/storage/error.h"
#include "csaq/storage/files.h"
#include "csaq/storage/npy.h"
#include "csaq/storage/safetensors.h"
#include "csaq/storage/tokenizer.h"

namespace csaq::cli {
namespace po = boost::program_options;
namespace fs = std::filesystem;

namespace {

// Byte-level BPE without merges: ids 0-255 are the bytes, then BOS and EOS.
std::string demo_tokenizer_json() {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[storage::byte_level_char(static_cast<unsigned char>(b))] = b;
  vocab["<|bos|>"] = 256;
  vocab["<|eos|>"] = 257;
  const nlohmann::json t = {
      {"version", "1.0"},
      {"added_tokens", {{{"id", 256}, {"content", "<|bos|>"}, {"special", true}},
                        {{"id", 257}, {"content", "<|eos|>"}, {"special", true}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"post_processor", {{"type", "TemplateProcessing"},
                          {"single", {{{"SpecialToken", {{"id", "<|bos|>"}, {"type_id", 0}}}},
                                      {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}, {"unk_token", nullptr},
                 {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr}, {"dropout", nullptr}}},
  };
  return t.dump(1) + "\n";
}

// Sentences from small word lists, `chars` characters or a little more.
std::string demo_text(std::size_t chars, std::uint64_t seed) {
  static const char* subjects[] = {"The cat", "A little girl", "The old man", "My friend", "The dog", "A bird", "Tom", "The teacher"};
  static const char* verbs[] = {"saw", "found", "liked", "carried", "painted", "lost", "shared", "wanted"};
  static const char* objects[] = {"a red ball", "the big tree", "a small boat", "the blue sky", "a warm cake", "the garden", "a new book", "the river"};
  static const char* endings[] = {".", " today.", " in the park.", " after lunch.", "!", " with a smile."};
  std::uint64_t state = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  auto next = [&](std::size_t n) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<std::size_t>((state >> 33) % n);
  };
  std::string text;
  while (text.size() < chars) {
    text += std::string(subjects[next(8)]) + " " + verbs[next(8)] + " " + objects[next(8)] + endings[next(6)];
    text += next(5) == 0 ? "\n\n" : " ";
  }
  return text;
}

}  // namespace

int run_make_demo(const std::vector<std::string>& args, Communicator& comm) {
  std::string out;
  std::int64_t layers = 4, hidden = 256, intermediate = 768, heads = 8, kv_heads = 4, vocab = 512,
               tokens = 16384;
  std::uint64_t seed = 0;
  std::string dtype = "float32";
  po::options_description options("csaq make-demo options");
  options.add_options()
      ("out", po::value(&out)->required(), "directory to create")
      ("layers", po::value(&layers)->default_value(layers), "decoder layers")
      ("hidden", po::value(&hidden)->default_value(hidden), "hidden size")
      ("intermediate", po::value(&intermediate)->default_value(intermediate), "MLP size")
      ("heads", po::value(&heads)->default_value(heads), "attention heads")
      ("kv-heads", po::value(&kv_heads)->default_value(kv_heads), "key/value heads (grouped-query attention)")
      ("vocab", po::value(&vocab)->default_value(vocab), "vocabulary size")
      ("tokens", po::value(&tokens)->default_value(tokens), "characters of calib.txt and tokens in tokens.npy")
      ("seed", po::value(&seed)->default_value(seed), "random seed")
      ("dtype", po::value(&dtype)->default_value(dtype), "dtype of the weights: float32 | bfloat16 | float16")
      ("overwrite", "replace files of an existing demo");
  po::variables_map vm;
  if (!parse_options("make-demo", options, args, vm, comm)) return 0;
  if (comm.rank() != 0) return 0;  // one writer; the files are the same for every rank
  const bool overwrite = vm.count("overwrite") > 0;
  const at::ScalarType weight_type = dtype_from_name(dtype);
  if (weight_type != at::kFloat && weight_type != at::kBFloat16 && weight_type != at::kHalf)
    throw UsageError{"--dtype must be float32, bfloat16 or float16, not '" + dtype + "'"};

  nlohmann::json config = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"vocab_size", vocab},
      {"hidden_size", hidden},
      {"intermediate_size", intermediate},
      {"num_hidden_layers", layers},
      {"num_attention_heads", heads},
      {"num_key_value_heads", kv_heads},
      {"hidden_act", "silu"},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", 10000.0},
      {"rope_scaling", nullptr},
      {"max_position_embeddings", 2048},
      {"tie_word_embeddings", false},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"bos_token_id", 1},
      {"eos_token_id", 2},
      {"torch_dtype", dtype_name(weight_type)},
  };
  const std::string config_text = config.dump(2) + "\n";
  const ModelConfig parsed = ModelConfig::parse(config_text, "demo config");  // validates the sizes
  if (vocab < 258) throw UsageError{"--vocab must be at least 258 (256 byte tokens, BOS, EOS)"};

  const fs::path dir(out);
  const std::string files[] = {(dir / "config.json").string(), (dir / "model.safetensors").string(),
                               (dir / "tokens.npy").string(), (dir / "tokenizer.json").string(),
                               (dir / "tokenizer_config.json").string(), (dir / "calib.txt").string(),
                               (dir / "heldout.txt").string()};
  for (const auto& f : files) storage::check_writable_target(f, overwrite);
  std::error_code ec;
  fs::create_directories(dir, ec);
  CSAQ_CHECK(!ec, "cannot create directory '", out, "': ", ec.message());

  auto weights = random_model_weights(parsed, seed);
  for (auto& [name, t] : weights) t = t.to(weight_type);
  storage::write_safetensors(files[1], weights, {}, overwrite);
  storage::write_file_atomic(files[3], demo_tokenizer_json(), overwrite);
  storage::write_file_atomic(files[4], R"({"bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": true})" "\n",
                             overwrite);
  // Text first; tokens.npy holds the first --tokens ids of calib.txt (one byte each here).
  const std::string calib = demo_text(static_cast<std::size_t>(tokens), seed + 1);
  storage::write_file_atomic(files[5], calib, overwrite);
  storage::write_file_atomic(files[6], demo_text(static_cast<std::size_t>(tokens) / 4 + 1, seed + 2), overwrite);
  const auto ids = storage::Tokenizer::load(out).encode(calib);
  storage::write_npy_tokens(files[2], at::tensor(ids, at::kLong).slice(0, 0, tokens), overwrite);
  storage::write_file_atomic(files[0], config_text, overwrite);
  std::printf("wrote %s: random model (%lld layers, hidden %lld, %.1f M parameters), byte-level tokenizer, "
              "calib.txt, heldout.txt, tokens.npy (%lld tokens)\n",
              out.c_str(), static_cast<long long>(layers), static_cast<long long>(hidden),
              static_cast<double>(layer_parameters(parsed) * layers + 2 * vocab * hidden + hidden) / 1e6,
              static_cast<long long>(tokens));
  return 0;
}

}  // namespace csaq::cli
