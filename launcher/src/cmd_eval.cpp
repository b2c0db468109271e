// csaq eval: perplexity = exp(mean next-token cross-entropy over every predicted position);
// with --reference, also the fidelity of the evaluated model to the reference: mean
// KL(P_ref || P_eval) per predicted token and top-1 agreement, in the same sharded pass.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
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

namespace {

// A model eval can run: a Hugging Face directory or a csaq checkpoint, this rank's layers.
struct Evaluable {
  std::unique_ptr<QuantizedCheckpoint> checkpoint;
  std::unique_ptr<ModelShard> model;
};

Evaluable open_evaluable(const std::string& model_dir, const std::string& checkpoint, at::ScalarType type,
                         Communicator& comm) {
  Evaluable e;
  if (!checkpoint.empty()) {
    e.checkpoint = std::make_unique<QuantizedCheckpoint>(checkpoint);
    e.model = std::make_unique<ModelShard>(e.checkpoint->config(), comm.rank(), comm.size(),
                                           e.checkpoint->source(), type);
  } else {
    model_config(model_dir, comm);  // warns about unused tensors
    e.model = std::make_unique<ModelShard>(load_model_shard(model_dir, comm.rank(), comm.size(), type));
  }
  return e;
}

struct Fidelity {
  LossTotals reference;
  double kl_sum = 0.0;
  std::int64_t top1_agree = 0;
};

// Every micro-batch through the reference and then the evaluated model; the last rank keeps
// one micro-batch of reference logits at a time. Sums run in micro-batch order on the last
// rank and are broadcast from it, so every world size gives the same figures.
Fidelity compare(Pipeline& reference, Pipeline& evaluated, const TokenSequences& data, std::int64_t batch_size,
                 LossTotals& totals, ProgressMeter& progress, Communicator& comm) {
  Fidelity f;
  const std::int64_t batches = evaluated.micro_batches(data);
  for (std::int64_t m = 0; m < batches; ++m) {
    const std::int64_t first = m * batch_size, count = std::min(batch_size, data.size() - first);
    const TokenSequences one(data.batch(first, count).reshape({-1}), data.seq_len(), -1, data.source());
    at::Tensor ref_logits;
    const LossTotals r = reference.evaluate(one, [&](std::int64_t, const at::Tensor&, const at::Tensor& logits) {
      ref_logits = logits;
    });
    const LossTotals e = evaluated.evaluate(one, [&](std::int64_t, const at::Tensor&, const at::Tensor& logits) {
      const Divergence d = next_token_divergence(ref_logits, logits);
      f.kl_sum += d.kl_sum;
      f.top1_agree += d.top1_agree;
      ref_logits = at::Tensor();
    });
    for (auto [sum, add] : {std::pair<LossTotals*, const LossTotals*>{&f.reference, &r}, {&totals, &e}}) {
      sum->nll_sum += add->nll_sum;
      sum->predicted_tokens += add->predicted_tokens;
      sum->sequences += add->sequences;
    }
    progress.update(m + 1);
  }
  at::Tensor sums = at::tensor({f.kl_sum, static_cast<double>(f.top1_agree)}, at::kDouble);
  {
    ScopedPhase phase("communication");
    comm.broadcast(sums, comm.size() - 1);
  }
  f.kl_sum = sums[0].item<double>();
  f.top1_agree = static_cast<std::int64_t>(sums[1].item<double>());
  return f;
}

}  // namespace

int run_eval(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_dir, quantized, reference, data_path, report_path, tokenizer, dtype = "auto";
  std::int64_t seq_len = 0, max_sequences = -1, batch_size = 1;
  int threads = 0;
  po::options_description options("csaq eval options");
  options.add_options()
      ("model", po::value(&model_dir), "Hugging Face model directory (config.json + safetensors)")
      ("quantized", po::value(&quantized), "csaq checkpoint to evaluate instead of --model")
      ("reference", po::value(&reference), "also compare with this model (a Hugging Face directory or a csaq checkpoint), "
                                           "usually the original: mean KL(P_reference || P_evaluated) per predicted token, "
                                           "top-1 agreement and the reference's perplexity")
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
                {{"--model", model_dir}, {"--quantized", quantized}, {"--reference", reference}, {"--data", data_path},
                 {"--tokenizer", tokenizer}},
                overwrite);
  set_threads(threads, comm);

  const auto t0 = std::chrono::steady_clock::now();
  const at::ScalarType type = compute_dtype(dtype);
  Evaluable evaluated = open_evaluable(model_dir, quantized, type, comm);
  const ModelShard& model = *evaluated.model;
  warn_if_beyond_positions(model.config(), seq_len, comm);
  Evaluable ref;
  if (!reference.empty()) {
    std::error_code ec;
    ref = std::filesystem::is_directory(reference, ec) ? open_evaluable(reference, "", type, comm)
                                                      : open_evaluable("", reference, type, comm);
    CSAQ_CHECK(ref.model->config().vocab_size == model.config().vocab_size, "--reference '", reference, "' has a vocabulary of ",
               ref.model->config().vocab_size, " tokens and the evaluated model '", quantized.empty() ? model_dir : quantized,
               "' one of ", model.config().vocab_size, ": their predictions cannot be compared");
  }
  // Text is tokenized with --tokenizer, else the model's own (a checkpoint keeps it).
  TokenizerLoader tok = tokenizer_in(tokenizer.empty() ? model_dir : tokenizer);
  if (tokenizer.empty() && evaluated.checkpoint) tok = [&] { return evaluated.checkpoint->tokenizer(); };
  TokenSequences data = load_sequences(data_path, tok, seq_len, max_sequences, Sampling::kContiguous, 0);
  data.check_vocabulary(model.config().vocab_size);
  Pipeline pipeline(model, comm, PipelineOptions{batch_size, 1});
  ProgressMeter progress("eval", "batches", pipeline.micro_batches(data), comm.rank() == 0);
  reset_phases();
  const auto t_pass = std::chrono::steady_clock::now();
  LossTotals totals;
  Fidelity fidelity;
  if (ref.model) {
    Pipeline ref_pipeline(*ref.model, comm, PipelineOptions{batch_size, 1});
    fidelity = compare(ref_pipeline, pipeline, data, batch_size, totals, progress, comm);
  } else {
    totals = pipeline.evaluate(data, {}, progress.callback());
  }
  const auto t_end = std::chrono::steady_clock::now();
  const double elapsed = std::chrono::duration<double>(t_end - t0).count();
  const double pass_s = std::chrono::duration<double>(t_end - t_pass).count();
  const double perplexity = std::exp(totals.mean_nll());
  const nlohmann::json phases = phases_json(comm, pass_s), memory = memory_json(comm);
  const double predicted = static_cast<double>(std::max<std::int64_t>(1, totals.predicted_tokens));
  const double kl = fidelity.kl_sum / predicted, agreement = static_cast<double>(fidelity.top1_agree) / predicted;
  const double ref_perplexity = std::exp(fidelity.reference.mean_nll());

  if (comm.rank() == 0) {
    std::printf("perplexity: %.4f\n", perplexity);
    if (ref.model) {
      std::printf("reference perplexity: %.4f\n", ref_perplexity);
      std::printf("KL divergence: %.6f\n", kl);
      std::printf("top-1 agreement: %.4f\n", agreement);
    }
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
      if (ref.model) {
        report["reference"] = reference;
        report["reference_perplexity"] = ref_perplexity;
        report["reference_mean_nll"] = fidelity.reference.mean_nll();
        report["kl_divergence"] = kl;  // mean KL(P_reference || P_evaluated) per predicted token, nats
        report["top1_agreement"] = agreement;
      }
      storage::write_file_atomic(report_path, report.dump(2) + "\n", overwrite);
    }
  }
  return 0;
}

}  // namespace csaq::cli
