// csaq eval: perplexity = exp(mean next-token cross-entropy over every predicted position).
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "usage.h"
#include "csaq/packer/checkpoint.h"
#include "csaq/shard/phases.h"
#include "csaq/shard/pipeline.h"
#include "csaq/shard/progress.h"
#include "csaq/storage/error.h"
#include "csaq/storage/files.h"

namespace csaq::cli {
namespace po = boost::program_options;

int run_eval(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_dir, quantized, data_path, report_path, tokenizer, dtype = "auto";
  std::int64_t seq_len = 0, max_sequences = -1, batch_size = 1;
  int threads = 0;
  po::options_description options("csaq eval options");
  options.add_options()
      ("model", po::value(&model_dir), "Hugging Face model directory (config.json + safetensors)")
      ("quantized", po::value(&quantized), "csaq checkpoint to evaluate instead of --model")
      ("data", po::value(&data_path)->required(), "text (.txt, .jsonl with a \"text\" field) or token ids (1-D .npy)")
      ("tokenizer", po::value(&tokenizer), "directory with tokenizer.json or tokenizer.model (default: --model's, or the one --quantized keeps)")
      ("seq-len", po::value(&seq_len)->required(), "tokens per sequence (non-overlapping windows, remainder dropped)")
      ("max-sequences", po::value(&max_sequences), "evaluate at most this many sequences (default: all)")
      ("batch-size", po::value(&batch_size)->default_value(1), "sequences per micro-batch")
      ("dtype", po::value(&dtype)->default_value(dtype), "compute dtype: auto (the checkpoint's), float32, bfloat16, float16")
      ("report", po::value(&report_path), "write a JSON report here")
      ("overwrite", "replace an existing --report file")
      ("threads", po::value(&threads)->default_value(0), "intra-op threads per rank (0: cores / ranks on the node)");
  po::variables_map vm;
  if (!parse_options("eval", options, args, vm, comm)) return 0;
  if (model_dir.empty() == quantized.empty()) throw UsageError{"give exactly one of --model and --quantized"};
  if (vm.count("max-sequences") && max_sequences < 1) throw UsageError{"--max-sequences must be at least 1"};
  if (batch_size < 1) throw UsageError{"--batch-size must be at least 1"};
  const bool overwrite = vm.count("overwrite") > 0;
  check_outputs(comm, {{"--report", report_path}},
                {{"--model", model_dir}, {"--quantized", quantized}, {"--data", data_path}, {"--tokenizer", tokenizer}},
                overwrite);
  set_threads(threads, comm);

  const auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<QuantizedCheckpoint> ckpt;
  if (!quantized.empty()) ckpt = std::make_unique<QuantizedCheckpoint>(quantized);
  const ModelConfig config = ckpt ? ckpt->config() : model_config(model_dir, comm);
  warn_if_beyond_positions(config, seq_len, comm);
  const at::ScalarType type = compute_dtype(dtype);
  ModelShard model = ckpt ? ModelShard(config, comm.rank(), comm.size(), ckpt->source(), type)
                          : load_model_shard(model_dir, comm.rank(), comm.size(), type);
  // Text is tokenized with --tokenizer, else the model's own (a checkpoint keeps it).
  TokenizerLoader tok = tokenizer_in(tokenizer.empty() ? model_dir : tokenizer);
  if (tokenizer.empty() && ckpt) tok = [&] { return ckpt->tokenizer(); };
  TokenSequences data = load_sequences(data_path, tok, seq_len, max_sequences,
                                       Sampling::kContiguous, 0);
  data.check_vocabulary(model.config().vocab_size);
  Pipeline pipeline(model, comm, PipelineOptions{batch_size, 1});
  ProgressMeter progress("eval", "batches", pipeline.micro_batches(data), comm.rank() == 0);
  reset_phases();
  const auto t_pass = std::chrono::steady_clock::now();
  const LossTotals totals = pipeline.evaluate(data, {}, progress.callback());
  const auto t_end = std::chrono::steady_clock::now();
  const double elapsed = std::chrono::duration<double>(t_end - t0).count();
  const double pass_s = std::chrono::duration<double>(t_end - t_pass).count();
  const double perplexity = std::exp(totals.mean_nll());
  const nlohmann::json phases = phases_json(comm, pass_s), memory = memory_json(comm);

  if (comm.rank() == 0) {
    std::printf("perplexity: %.4f\n", perplexity);
    std::fflush(stdout);
    if (!report_path.empty()) {
      nlohmann::json partition = nlohmann::json::array();
      for (const auto& r : model.partition()) partition.push_back({r.begin, r.end});
      nlohmann::json report = {
          {"command", "eval"},
          {"csaq_version", CSAQ_VERSION},
          {"model", model_dir},
          {"quantized", quantized},
          {"data", data_path},
          {"perplexity", perplexity},
          {"mean_nll", totals.mean_nll()},
          {"tokens", data.tokens()},
          {"predicted_tokens", totals.predicted_tokens},
          {"sequences", totals.sequences},
          {"seq_len", seq_len},
          {"batch_size", batch_size},
          {"world_size", comm.size()},
          {"layer_partition", partition},
          {"dtype", c10::toString(type)},
          {"elapsed_s", elapsed},
          {"tokens_per_s", elapsed > 0 ? static_cast<double>(data.tokens()) / elapsed : 0.0},
          {"pass_s", pass_s},
          {"pass_tokens_per_s", pass_s > 0 ? static_cast<double>(data.tokens()) / pass_s : 0.0},
          {"phases", phases},
          {"memory", memory},
          {"runtime", runtime_json()},
      };
      storage::write_file_atomic(report_path, report.dump(2) + "\n", overwrite);
    }
  }
  return 0;
}

}  // namespace csaq::cli
