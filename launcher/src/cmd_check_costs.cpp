// csaq check-costs: how well each cost model predicts the loss increase of quantizing.
//
// Samples units (one row of a decoder Linear, or a whole Linear) and formats, quantizes that
// unit alone exactly as pack would (GPTQ on the salience file's input Hessians; every row on
// its own parameters), measures two true changes on --data — of the mean next-token loss,
// and the mean KL(P_original || P_moved) per predicted token (the fidelity objective's
// target) — and reports the rank correlation between each cost model's prediction and each.
// The last rank keeps the original model's logits of all of --data (sequences × seq-len ×
// vocabulary × 4 bytes).
#include <ATen/ATen.h>

#include <algorithm>

#include <cstdio>
#include <map>
#include <random>

#include "commands.h"
#include "csaq/profiler/profiler.h"
#include "csaq/shard/pipeline.h"
#include "csaq/shard/progress.h"
#include "csaq/solver/solver.h"
#include "csaq/storage/error.h"
#include "csaq/storage/files.h"
#include "csaq/storage/h5.h"
#include "stages.h"

namespace csaq::cli {
namespace po = boost::program_options;
using nlohmann::json;

namespace {

struct Sample {
  std::int64_t layer = 0;
  int linear = 0;
  std::int64_t row = -1;  // -1: the whole Linear
  std::size_t pair = 0;
};

// Pearson correlation of two equally long vectors.
double pearson(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.to(at::kDouble) - a.to(at::kDouble).mean(), y = b.to(at::kDouble) - b.to(at::kDouble).mean();
  const double d = std::sqrt((x * x).sum().item<double>() * (y * y).sum().item<double>());
  return d > 0 ? (x * y).sum().item<double>() / d : 0.0;
}

}  // namespace

int run_check_costs(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_dir, profile_path, data_path, tokenizer, unit = "row", report_path;
  std::int64_t seq_len = 0, max_sequences = -1, samples = 120;
  std::uint64_t seed = 0;
  int threads = 0;
  FormatArgs fa;
  po::options_description options("csaq check-costs options");
  options.add_options()
      ("model", po::value(&model_dir)->required(), "Hugging Face model directory")
      ("profile", po::value(&profile_path)->required(), "salience file from csaq profile (with --salience pqi to include it)")
      ("data", po::value(&data_path)->required(), "text or token ids on which the true loss change is measured")
      ("tokenizer", po::value(&tokenizer), "directory with tokenizer.json or tokenizer.model (default: --model)")
      ("seq-len", po::value(&seq_len)->required(), "tokens per sequence")
      ("max-sequences", po::value(&max_sequences), "use at most this many sequences of --data")
      ("unit", po::value(&unit)->default_value(unit), "row (one row of a Linear) | linear (a whole Linear)")
      ("samples", po::value(&samples)->default_value(samples), "units to quantize and measure")
      ("seed", po::value(&seed)->default_value(seed), "seed of the sample");
  fa.add(options);
  options.add_options()
      ("report", po::value(&report_path), "write every sample and the correlations as JSON here")
      ("overwrite", "replace an existing --report")
      ("threads", po::value(&threads)->default_value(threads), "intra-op threads per rank (0: cores / ranks on the node)");
  po::variables_map vm;
  if (!parse_options("check-costs", options, args, vm, comm)) return 0;
  if (unit != "row" && unit != "linear") throw UsageError{"--unit must be row or linear"};
  if (samples < 3) throw UsageError{"--samples must be at least 3"};
  const bool overwrite = vm.count("overwrite") > 0;
  check_outputs(comm, {{"--report", report_path}},
                {{"--model", model_dir}, {"--profile", profile_path}, {"--data", data_path}, {"--tokenizer", tokenizer}},
                overwrite);
  set_threads(threads, comm);
  SolverOptions sopt;
  fa.apply(sopt);

  ModelShard model = load_model_shard(model_dir, comm.rank(), comm.size());
  std::unique_ptr<Profiler> profiler = load_profile(profile_path, model, comm, SalienceKind::kTaylor);
  const json saved = json::parse(storage::H5File::open_read(profile_path).read_text("profile.json"));
  std::vector<SalienceKind> kinds{SalienceKind::kTaylor,  SalienceKind::kHessian,    SalienceKind::kCausal,
                                  SalienceKind::kFisher,  SalienceKind::kActivation, SalienceKind::kMagnitude};
  if (saved.contains("pqi") && saved["pqi"]["bit_options"] == json(sopt.bit_options) &&
      saved["pqi"]["group_options"] == json(sopt.group_options))
    kinds.insert(kinds.begin() + 2, SalienceKind::kPqi);
  // Statistics are kept for the cost model a file was profiled for (all of them with
  // --keep-all-statistics); the others are left out, saying so.
  std::vector<SalienceKind> missing;
  for (SalienceKind k : kinds)
    if (!profiler->has_statistics_for(k)) missing.push_back(k);
  for (SalienceKind k : missing) {
    kinds.erase(std::find(kinds.begin(), kinds.end(), k));
    if (comm.rank() == 0)
      std::fprintf(stderr, "csaq check-costs: '%s' holds no statistics for cost model %s (profile with "
                   "--keep-all-statistics to compare every model); left out\n", profile_path.c_str(),
                   salience_kind_name(k));
  }
  TokenSequences data = load_sequences(data_path, tokenizer_in(tokenizer.empty() ? model_dir : tokenizer), seq_len,
                                       max_sequences, Sampling::kContiguous, 0);
  data.check_vocabulary(model.config().vocab_size);
  Pipeline pipeline(model, comm, PipelineOptions{1, 1});
  std::vector<at::Tensor> base_logits;  // last rank: per sequence
  const double base = pipeline.evaluate(data, [&](std::int64_t, const at::Tensor&, const at::Tensor& logits) {
                                base_logits.push_back(logits);
                              }).mean_nll();

  // The sample: the same on every rank (one generator, the config's shapes).
  const auto pairs = option_pairs(sopt);
  std::vector<std::size_t> coded;  // pairs below 16 bits
  for (std::size_t p = 0; p < pairs.size(); ++p)
    if (pairs[p].first != 16) coded.push_back(p);
  CSAQ_CHECK(!coded.empty(), "--bit-options has no width below 16");
  const ModelConfig& c = model.config();
  const auto shapes = linear_shapes(c);
  std::int64_t rows_per_layer = 0;
  for (const auto& s : shapes) rows_per_layer += s.first;
  std::mt19937_64 gen(seed);
  std::vector<Sample> picks;
  for (std::int64_t n = 0; n < samples; ++n) {
    Sample s;
    if (unit == "row") {
      std::int64_t r = static_cast<std::int64_t>(gen() % static_cast<std::uint64_t>(rows_per_layer * c.num_layers));
      s.layer = r / rows_per_layer;
      r %= rows_per_layer;
      while (r >= shapes[static_cast<std::size_t>(s.linear)].first) r -= shapes[static_cast<std::size_t>(s.linear++)].first;
      s.row = r;
    } else {
      const auto k = static_cast<std::int64_t>(gen() % static_cast<std::uint64_t>(c.num_layers * kNumLinears));
      s.layer = k / kNumLinears;
      s.linear = static_cast<int>(k % kNumLinears);
    }
    s.pair = coded[gen() % coded.size()];
    picks.push_back(s);
  }

  std::map<std::tuple<std::int64_t, int, std::size_t>, at::Tensor> deltas;  // this rank's, computed once
  at::Tensor truth = at::zeros({samples}, at::kDouble), truth_kl = at::zeros({samples}, at::kDouble);
  at::Tensor predicted = at::zeros({static_cast<std::int64_t>(kinds.size()), samples}, at::kDouble);
  ProgressMeter progress("check-costs", "units", samples, comm.rank() == 0);
  for (std::int64_t n = 0; n < samples; ++n) {
    const Sample& s = picks[static_cast<std::size_t>(n)];
    const bool mine = model.layers().contains(s.layer);
    at::Tensor original;
    if (mine) {
      const at::Tensor w = profiler->weights(s.layer, s.linear).weight.detach().to(at::kFloat);
      const Format f{pairs[s.pair].first, effective_group(w.size(1), pairs[s.pair].second)};
      auto& delta = deltas[{s.layer, s.linear, s.pair}];
      if (!delta.defined())
        for_each_format(w, at::arange(w.size(0), at::kLong), profiler->linear_hessian(s.layer, s.linear), {f},
                        sopt.quantizer, [&](std::size_t, const Quantized& q) { delta = q.values - w; });
      for (std::size_t k = 0; k < kinds.size(); ++k) {
        const at::Tensor cost = profiler->row_cost(s.layer, s.linear, kinds[k], delta, s.pair);
        predicted[static_cast<std::int64_t>(k)][n] = s.row >= 0 ? cost[s.row].item<double>() : cost.sum().item<double>();
      }
      original = profiler->weights(s.layer, s.linear).weight.detach().clone();
      at::Tensor moved = w.clone();
      if (s.row >= 0) moved[s.row] += delta[s.row];
      else moved += delta;
      model.set_linear_weight(s.layer, s.linear, moved);
    }
    double kl_sum = 0;
    const LossTotals moved = pipeline.evaluate(data, [&](std::int64_t m, const at::Tensor&, const at::Tensor& logits) {
      kl_sum += next_token_divergence(base_logits[static_cast<std::size_t>(m)], logits).kl_sum;
    });
    truth[n] = moved.mean_nll() - base;
    truth_kl[n] = kl_sum / static_cast<double>(std::max<std::int64_t>(1, moved.predicted_tokens));
    if (mine) model.set_linear_weight(s.layer, s.linear, original);
    progress.update(n + 1);
  }
  comm.all_reduce(predicted, ReduceOp::kSum);  // each sample's predictions come from one rank
  comm.broadcast(truth_kl, comm.size() - 1);    // measured on the last rank

  if (comm.rank() == 0) {
    std::printf("%lld %s units on %s (%lld tokens), base loss %.6f; correlation with the true change of the loss "
                "and of KL(original || quantized):\n",
                static_cast<long long>(samples), unit == "row" ? "row" : "Linear", data_path.c_str(),
                static_cast<long long>(data.tokens()), base);
    json report = {{"command", "check-costs"}, {"csaq_version", CSAQ_VERSION}, {"model", model_dir},
                   {"profile", profile_path}, {"objective", saved.value("objective", json(nullptr))},
                   {"data", data_path}, {"unit", unit}, {"base_nll", base},
                   {"bit_options", sopt.bit_options}, {"group_options", sopt.group_options},
                   {"quantizer", quantizer_json(sopt.quantizer, true)}};
    for (std::size_t k = 0; k < kinds.size(); ++k) {
      const at::Tensor p = predicted[static_cast<std::int64_t>(k)];
      const double rho = spearman(p, truth), r = pearson(p, truth);
      const double rho_kl = spearman(p, truth_kl), r_kl = pearson(p, truth_kl);
      std::printf("  %-10s loss: spearman %6.3f  pearson %6.3f   KL: spearman %6.3f  pearson %6.3f\n",
                  salience_kind_name(kinds[k]), rho, r, rho_kl, r_kl);
      report["spearman"][salience_kind_name(kinds[k])] = rho;
      report["pearson"][salience_kind_name(kinds[k])] = r;
      report["spearman_kl"][salience_kind_name(kinds[k])] = rho_kl;
      report["pearson_kl"][salience_kind_name(kinds[k])] = r_kl;
    }
    json list = json::array();
    for (std::int64_t n = 0; n < samples; ++n) {
      const Sample& s = picks[static_cast<std::size_t>(n)];
      json one = {{"layer", s.layer}, {"linear", kLinearNames.at(s.linear)}, {"row", s.row},
                  {"bits", pairs[s.pair].first}, {"group", pairs[s.pair].second}, {"true", truth[n].item<double>()},
                  {"true_kl", truth_kl[n].item<double>()}};
      for (std::size_t k = 0; k < kinds.size(); ++k)
        one["predicted"][salience_kind_name(kinds[k])] = predicted[static_cast<std::int64_t>(k)][n].item<double>();
      list.push_back(one);
    }
    report["samples"] = list;
    if (!report_path.empty()) storage::write_file_atomic(report_path, report.dump(2) + "\n", overwrite);
  }
  return 0;
}

}  // namespace csaq::cli
