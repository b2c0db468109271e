// csaq make-demo: a small random Llama-architecture checkpoint in Hugging Face format plus a
// token file, so that every command can be tried on a fresh machine without downloads.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "csaq/shard/model.h"
#include "csaq/storage/error.h"
#include "csaq/storage/files.h"
#include "csaq/storage/npy.h"
#include "csaq/storage/safetensors.h"

namespace csaq::cli {
namespace po = boost::program_options;
namespace fs = std::filesystem;

int run_make_demo(const std::vector<std::string>& args, Communicator& comm) {
  std::string out;
  std::int64_t layers = 4, hidden = 256, intermediate = 768, heads = 8, kv_heads = 4, vocab = 512,
               tokens = 16384;
  std::uint64_t seed = 0;
  po::options_description options("csaq make-demo options");
  options.add_options()
      ("out", po::value(&out)->required(), "directory to create (config.json, model.safetensors, tokens.npy)")
      ("layers", po::value(&layers)->default_value(layers), "decoder layers")
      ("hidden", po::value(&hidden)->default_value(hidden), "hidden size")
      ("intermediate", po::value(&intermediate)->default_value(intermediate), "MLP size")
      ("heads", po::value(&heads)->default_value(heads), "attention heads")
      ("kv-heads", po::value(&kv_heads)->default_value(kv_heads), "key/value heads (grouped-query attention)")
      ("vocab", po::value(&vocab)->default_value(vocab), "vocabulary size")
      ("tokens", po::value(&tokens)->default_value(tokens), "tokens in tokens.npy")
      ("seed", po::value(&seed)->default_value(seed), "random seed")
      ("overwrite", "replace files of an existing demo");
  po::variables_map vm;
  if (!parse_options("make-demo", options, args, vm, comm)) return 0;
  if (comm.rank() != 0) return 0;  // one writer; the files are the same for every rank
  const bool overwrite = vm.count("overwrite") > 0;

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
      {"torch_dtype", "float32"},
  };
  const std::string config_text = config.dump(2) + "\n";
  const ModelConfig parsed = ModelConfig::parse(config_text, "demo config");  // validates the sizes

  const fs::path dir(out);
  const std::string files[] = {(dir / "config.json").string(), (dir / "model.safetensors").string(),
                               (dir / "tokens.npy").string()};
  for (const auto& f : files) storage::check_writable_target(f, overwrite);
  std::error_code ec;
  fs::create_directories(dir, ec);
  CSAQ_CHECK(!ec, "cannot create directory '", out, "': ", ec.message());

  storage::write_safetensors(files[1], random_model_weights(parsed, seed), {}, overwrite);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
  storage::write_npy_tokens(files[2], at::randint(vocab, {tokens}, gen, at::kLong), overwrite);
  storage::write_file_atomic(files[0], config_text, overwrite);
  std::printf("wrote %s (%lld layers, hidden %lld, %.1f M parameters) and %s (%lld tokens)\n",
              out.c_str(), static_cast<long long>(layers), static_cast<long long>(hidden),
              static_cast<double>(layer_parameters(parsed) * layers + 2 * vocab * hidden + hidden) / 1e6,
              files[2].c_str(), static_cast<long long>(tokens));
  return 0;
}

}  // namespace csaq::cli
