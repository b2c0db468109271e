// csaq export / csaq inspect: reading a quantized checkpoint.
#include <ATen/ATen.h>

#include <cstdio>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "csaq/packer/checkpoint.h"
#include "csaq/storage/error.h"

namespace csaq::cli {
namespace po = boost::program_options;

int run_export(const std::vector<std::string>& args, Communicator& comm) {
  std::string ckpt_path, out, dtype = "auto";
  double shard_gb = 5.0;
  po::options_description options("csaq export options");
  options.add_options()
      ("quantized", po::value(&ckpt_path)->required(), "csaq checkpoint (HDF5)")
      ("out", po::value(&out)->required(), "directory for config.json + safetensors")
      ("format", po::value<std::string>()->default_value("safetensors"), "output format (safetensors)")
      ("dtype", po::value(&dtype)->default_value(dtype), "auto (the source model's) | float32 | float16 | bfloat16")
      ("max-shard-gb", po::value(&shard_gb)->default_value(shard_gb), "largest safetensors file before sharding")
      ("overwrite", "replace existing files in --out");
  po::variables_map vm;
  if (!parse_options("export", options, args, vm, comm)) return 0;
  if (vm["format"].as<std::string>() != "safetensors") throw UsageError{"--format must be safetensors"};
  const at::ScalarType named = dtype_from_name(dtype);
  if (named == at::ScalarType::Undefined && dtype != "auto")
    throw UsageError{"--dtype must be auto, float32, float16 or bfloat16"};
  if (comm.rank() != 0) return 0;  // one writer
  QuantizedCheckpoint ckpt(ckpt_path);
  const at::ScalarType type = dtype == "auto" ? checkpoint_dtype(ckpt.config()) : named;
  const auto files = export_checkpoint(ckpt, out, type, static_cast<std::uint64_t>(shard_gb * 1e9),
                                       vm.count("overwrite") > 0);
  std::printf("wrote %zu files to %s (%s)\n", files.size(), out.c_str(), dtype_name(type));
  return 0;
}

int run_inspect(const std::vector<std::string>& args, Communicator& comm) {
  std::string ckpt_path;
  po::options_description options("csaq inspect options");
  options.add_options()("checkpoint", po::value(&ckpt_path)->required(), "csaq checkpoint (HDF5)");
  po::positional_options_description positional;
  positional.add("checkpoint", 1);
  po::variables_map vm;
  options.add_options()("help,h", "show this help");
  po::store(po::command_line_parser(args).options(options).positional(positional).run(), vm);
  if (vm.count("help")) {
    if (comm.rank() == 0) std::cout << "usage: csaq inspect CHECKPOINT\n\n" << options;
    return 0;
  }
  po::notify(vm);
  if (comm.rank() != 0) return 0;
  QuantizedCheckpoint ckpt(ckpt_path);
  const ModelConfig& c = ckpt.config();
  std::printf("%s: csaq checkpoint, format version %lld\n", ckpt_path.c_str(), static_cast<long long>(kCheckpointFormatVersion));
  std::printf("model: %s, %lld layers, hidden %lld, vocab %lld\n", c.model_type.c_str(), static_cast<long long>(c.num_layers),
              static_cast<long long>(c.hidden_size), static_cast<long long>(c.vocab_size));
  // Recounted from the stored datasets, not taken from the report.
  std::map<std::string, std::int64_t> weights_at;  // "4-bit g128" -> weights
  std::int64_t weights = 0, leaders = 0, stored = 0;
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    std::int64_t layer_weights = 0, layer_bits = 0;
    for (int i = 0; i < kNumLinears; ++i) {
      const PackedLinear p = ckpt.linear(l, i);
      const LinearLayout layout = decode_layout(p, ckpt.linear_where(l, i));
      const at::Tensor count = at::bincount(layout.row_format, {}, static_cast<std::int64_t>(layout.formats.size()));
      for (std::size_t f = 0; f < layout.formats.size(); ++f) {
        const Format& fm = layout.formats[f];
        char name[48];
        std::snprintf(name, sizeof(name), fm.bits == 16 ? "%2d-bit fp16" : "%2d-bit g%lld", fm.bits,
                      static_cast<long long>(fm.group));
        weights_at[name] += count[static_cast<std::int64_t>(f)].item<std::int64_t>() * p.in;
      }
      leaders += (layout.row_leader == at::arange(p.out, at::kLong)).sum().item<std::int64_t>();
      layer_weights += p.out * p.in;
      layer_bits += p.stored_bits();
    }
    weights += layer_weights;
    stored += layer_bits;
    std::printf("layer %3lld: %.3f bits per weight stored\n", static_cast<long long>(l),
                double(layer_bits) / double(layer_weights));
  }
  std::printf("decoder weights: %lld in %lld units, %.4f bits per weight stored\n", static_cast<long long>(weights),
              static_cast<long long>(leaders), double(stored) / double(weights));
  for (const auto& [name, n] : weights_at)
    if (n > 0) std::printf("  %s: %lld weights (%.1f%%)\n", name.c_str(), static_cast<long long>(n), 100.0 * double(n) / double(weights));
  const auto report = nlohmann::json::parse(ckpt.report_json());
  if (report.contains("bits"))
    std::printf("report: %.4f total bits per weight, %.4f payload\n", report["bits"]["total_per_weight"].get<double>(),
                report["bits"]["payload_per_weight"].get<double>());
  return 0;
}

}  // namespace csaq::cli
