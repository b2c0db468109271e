// csaq quantize: profile (stage 1) -> solve (stage 2) -> pack (stage 3) in one run.
#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "csaq/packer/checkpoint.h"
#include "csaq/profiler/profiler.h"
#include "csaq/shard/pipeline.h"
#include "csaq/shard/progress.h"
#include "csaq/solver/solver.h"
#include "csaq/storage/error.h"
#include "csaq/storage/files.h"

namespace csaq::cli {
namespace po = boost::program_options;
using nlohmann::json;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// 16-bit dtype of the source checkpoint, for the tensors kept unquantized; float32 otherwise.
at::ScalarType dense_dtype(const ModelConfig& c) {
  const json j = json::parse(c.json_text);
  const std::string t = j.value("torch_dtype", j.value("dtype", std::string("float32")));
  if (t == "bfloat16") return at::kBFloat16;
  if (t == "float16") return at::kHalf;
  return at::kFloat;
}

json clique_stats(const Plan& plan, Communicator& comm) {
  at::Tensor sums = at::zeros({2}, at::kLong), largest = at::zeros({1}, at::kLong);
  for (const auto& lp : plan.linears) {
    const at::Tensor sizes = at::bincount(lp.row_leader, {}, lp.row_leader.size(0));
    const at::Tensor multi = sizes.masked_select(sizes >= 2);
    sums[0] += multi.numel();
    sums[1] += multi.sum();
    if (multi.numel() > 0) largest.fill_(std::max(largest.item<std::int64_t>(), multi.max().item<std::int64_t>()));
  }
  comm.all_reduce(sums, ReduceOp::kSum);
  comm.all_reduce(largest, ReduceOp::kMax);
  const std::int64_t count = sums[0].item<std::int64_t>();
  return {{"count", count},
          {"rows_in_cliques", sums[1].item<std::int64_t>()},
          {"mean_size", count ? double(sums[1].item<std::int64_t>()) / double(count) : 0.0},
          {"max_size", largest.item<std::int64_t>()}};
}

}  // namespace

int run_quantize(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_dir, calib, out, report_path, bit_options = "2,4,8,16", salience = "causal", method = "csaq",
              solver = "lagrangian", target_kind = "total";
  std::int64_t samples = 64, seq_len = 2048, group_size = 128, batch_size = 1, in_flight = 4, candidates = 512;
  double target = 0, clique_threshold = 0.85, rho = 0.98;
  int threads = 0;
  po::options_description options("csaq quantize options");
  options.add_options()
      ("model", po::value(&model_dir)->required(), "Hugging Face model directory")
      ("calib", po::value(&calib), "calibration tokens (1-D .npy); not needed by --method rtn")
      ("samples", po::value(&samples)->default_value(samples), "calibration sequences")
      ("seq-len", po::value(&seq_len)->default_value(seq_len), "tokens per calibration sequence")
      ("target-bits", po::value(&target)->required(), "average bits per decoder weight")
      ("target", po::value(&target_kind)->default_value(target_kind), "what --target-bits counts: total (codes + scales, zero-points, maps) or payload (codes only)")
      ("bit-options", po::value(&bit_options)->default_value(bit_options), "allowed bits, any of 1,2,3,4,8,16")
      ("group-size", po::value(&group_size)->default_value(group_size), "weights per scale along the input dimension (-1: whole row)")
      ("clique-threshold", po::value(&clique_threshold)->default_value(clique_threshold), "Jaccard similarity that joins a channel to a clique")
      ("candidates", po::value(&candidates)->default_value(candidates), "co-activation channels tracked per Linear (K)")
      ("salience", po::value(&salience)->default_value(salience), "causal | fisher | activation | magnitude")
      ("method", po::value(&method)->default_value(method), "csaq (salience-driven bits) | rtn (uniform round-to-nearest)")
      ("solver", po::value(&solver)->default_value(solver), "lagrangian | threshold")
      ("early-stop-rho", po::value(&rho)->default_value(rho), "stop calibrating once salience's Spearman rho reaches this (> 1: never)")
      ("batch-size", po::value(&batch_size)->default_value(batch_size), "sequences per micro-batch")
      ("in-flight", po::value(&in_flight)->default_value(in_flight), "micro-batches in flight in the pipeline")
      ("out", po::value(&out)->required(), "checkpoint to write (HDF5)")
      ("report", po::value(&report_path), "also write the JSON report here")
      ("overwrite", "replace existing --out / --report")
      ("threads", po::value(&threads)->default_value(threads), "intra-op threads per rank (0: cores / ranks on the node)");
  po::variables_map vm;
  if (!parse_options("quantize", options, args, vm, comm)) return 0;
  if (method != "csaq" && method != "rtn") throw UsageError{"--method must be csaq or rtn"};
  if (target_kind != "total" && target_kind != "payload") throw UsageError{"--target must be total or payload"};
  if (method == "csaq" && calib.empty()) throw UsageError{"--calib is required for --method csaq"};
  const bool overwrite = vm.count("overwrite") > 0;
  if (comm.rank() == 0) {
    storage::check_writable_target(out, overwrite);
    if (!report_path.empty()) storage::check_writable_target(report_path, overwrite);
  }
  set_threads(threads, comm);
  const auto t_start = std::chrono::steady_clock::now();

  SolverOptions sopt;
  sopt.kind = method == "rtn" ? SolverKind::kUniform : parse_solver_kind(solver);
  sopt.bit_options = parse_bit_options(bit_options);
  sopt.target_bits = target;
  sopt.target_is_total = target_kind == "total";
  sopt.group_size = group_size;
  ProfilerOptions popt;
  popt.kind = parse_salience_kind(salience);
  popt.candidates = candidates;
  popt.rho = rho;
  popt.early_stop = rho <= 1.0;

  // Everything that can be checked cheaply is checked before loading or calibrating.
  const ModelConfig config = ModelConfig::load(model_dir);
  std::vector<std::pair<std::int64_t, std::int64_t>> shapes;
  for (std::int64_t l = 0; l < config.num_layers; ++l)
    for (const auto& s : linear_shapes(config)) shapes.push_back(s);
  check_target_reachable(shapes, sopt);

  ModelShard model = load_model_shard(model_dir, comm.rank(), comm.size());
  const double load_s = seconds_since(t_start);
  json report = {{"command", "quantize"}, {"csaq_version", CSAQ_VERSION}, {"model", model_dir},
                 {"method", method}, {"world_size", comm.size()}};

  // Stage 1: profile.
  auto t = std::chrono::steady_clock::now();
  Profiler profiler(model, comm, popt);
  LossTotals calib_totals;
  std::int64_t sequences_available = 0;
  if (method == "csaq") {
    TokenSequences data = TokenSequences::from_npy(calib, seq_len, samples);
    data.check_vocabulary(config.vocab_size);
    sequences_available = data.size();
    Pipeline pipeline(model, comm, PipelineOptions{batch_size, in_flight});
    ProgressMeter progress("profile", "batches", pipeline.micro_batches(data), comm.rank() == 0);
    calib_totals = pipeline.calibrate(data, profiler.gradient_callback(), &profiler.observer(), {},
                                      [&](std::int64_t done, std::int64_t) { progress.update(done); },
                                      profiler.round_callback());
  }
  const double profile_s = seconds_since(t);

  // Stage 2: solve.
  t = std::chrono::steady_clock::now();
  std::vector<LinearInput> inputs;
  for (const DecoderLayer& layer : model.decoder())
    for (int i = 0; i < kNumLinears; ++i) {
      LinearInput in{layer.index, i, layer.linears[i].weight.detach(), {}, {}};
      if (method == "csaq") {
        in.salience = profiler.salience(layer.index, i, popt.kind);
        in.row_leader = profiler.row_leaders(layer.index, i, clique_threshold);
      } else {
        in.row_leader = at::arange(in.weight.size(0), at::kLong);
      }
      inputs.push_back(std::move(in));
    }
  const Plan plan = solve(inputs, config.num_layers, comm, sopt);
  const double solve_s = seconds_since(t);
  const PlanSummary& s = plan.summary;
  if (comm.rank() == 0)
    std::fprintf(stderr, "[solve] %lld units, %.4f total bits per weight (%.4f payload), target %.4f %s\n",
                 static_cast<long long>(s.units), s.total_per_weight(), s.payload_per_weight(), target,
                 target_kind.c_str());

  json histogram = json::object();
  for (const auto& [bits, weights] : s.histogram) histogram[std::to_string(bits)] = weights;
  report["bits"] = {{"target", target},
                    {"target_counts", target_kind},
                    {"total_per_weight", s.total_per_weight()},
                    {"payload_per_weight", s.payload_per_weight()},
                    {"histogram", histogram},
                    {"per_layer_total", s.layer_total_bits},
                    {"weights", s.weights},
                    {"total_bits", s.total_bits},
                    {"budget_bits", s.budget_bits},
                    {"options", sopt.bit_options},
                    {"group_size", group_size}};
  const std::uint64_t vh = static_cast<std::uint64_t>(config.vocab_size) * config.hidden_size;
  const at::ScalarType dense = dense_dtype(config);
  report["unquantized"] = {{"embedding_and_lm_head_parameters", config.tie_word_embeddings ? vh : 2 * vh},
                           {"bits", c10::elementSize(dense) * 8}};
  report["solver"] = {{"kind", solver_kind_name(sopt.kind)}, {"lambda", s.lambda}, {"units", s.units}};
  report["cliques"] = clique_stats(plan, comm);
  report["cliques"]["threshold"] = clique_threshold;
  if (method == "csaq") {
    json checks = json::array();
    for (const auto& c : profiler.early_stop_checks()) checks.push_back({{"sequences", c.sequences}, {"rho", c.rho}});
    report["salience"] = salience_kind_name(popt.kind);
    report["early_stop"] = {{"sequences_used", calib_totals.sequences},
                            {"sequences_available", sequences_available},
                            {"stopped_early", profiler.stopped_early()},
                            {"rho", profiler.early_stop_checks().empty() ? json(nullptr) : json(profiler.early_stop_checks().back().rho)},
                            {"rho_threshold", rho},
                            {"checks", checks}};
    report["calibration"] = {{"data", calib}, {"seq_len", seq_len}, {"mean_nll", calib_totals.mean_nll()},
                             {"tokens", calib_totals.sequences * seq_len}};
    report["agreement_top5"] =
        top_fraction_agreement(profiler, SalienceKind::kCausal, SalienceKind::kActivation, 0.05, comm);
  }
  report["time_s"] = {{"load", load_s}, {"profile", profile_s}, {"solve", solve_s}};

  // Stage 3: pack.
  t = std::chrono::steady_clock::now();
  write_checkpoint(out, model, plan, group_size, report.dump(2), dense, comm, overwrite);
  report["time_s"]["pack"] = seconds_since(t);
  report["time_s"]["total"] = seconds_since(t_start);
  if (comm.rank() == 0) {
    std::printf("wrote %s: %.4f total bits per weight (%.4f payload)\n", out.c_str(), s.total_per_weight(),
                s.payload_per_weight());
    if (!report_path.empty()) storage::write_file_atomic(report_path, report.dump(2) + "\n", overwrite);
  }
  return 0;
}

}  // namespace csaq::cli
