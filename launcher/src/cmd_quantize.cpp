// csaq quantize: profile (stage 1) -> solve (stage 2) -> pack (stage 3) in one run; and each
// stage alone: csaq profile (-> salience file), csaq solve (salience file -> plan file, any
// budget, no recomputation), csaq pack (plan file -> checkpoint).
#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "calibration_checkpoint.h"
#include "commands.h"
#include "csaq/packer/checkpoint.h"
#include "csaq/profiler/profiler.h"
#include "csaq/shard/pipeline.h"
#include "csaq/shard/progress.h"
#include "csaq/solver/solver.h"
#include "csaq/storage/error.h"
#include "csaq/storage/files.h"
#include "csaq/storage/h5.h"

namespace csaq::cli {
namespace po = boost::program_options;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

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

// Options of stage 1.
struct ProfileArgs {
  std::string calib, tokenizer, sampling = "random", salience = "causal", checkpoint_dir, resume = "auto", dtype = "auto";
  std::int64_t samples = 64, seq_len = 2048, batch_size = 1, in_flight = 4, candidates = 512, checkpoint_every = 32;
  std::uint64_t seed = 0;
  double rho = 0.98;

  void add(po::options_description& o) {
    o.add_options()
        ("calib", po::value(&calib), "calibration text (.txt, .jsonl with a \"text\" field) or token ids (1-D .npy)")
        ("tokenizer", po::value(&tokenizer), "directory with tokenizer.json or tokenizer.model (default: --model)")
        ("sampling", po::value(&sampling)->default_value(sampling), "random (windows at seeded random offsets) | contiguous")
        ("seed", po::value(&seed)->default_value(seed), "seed of the random calibration windows")
        ("samples", po::value(&samples)->default_value(samples), "calibration sequences")
        ("seq-len", po::value(&seq_len)->default_value(seq_len), "tokens per calibration sequence")
        ("salience", po::value(&salience)->default_value(salience), "causal | fisher | activation | magnitude")
        ("candidates", po::value(&candidates)->default_value(candidates), "co-activation channels tracked per Linear (K)")
        ("early-stop-rho", po::value(&rho)->default_value(rho), "stop calibrating once salience's Spearman rho reaches this (> 1: never)")
        ("batch-size", po::value(&batch_size)->default_value(batch_size), "sequences per micro-batch")
        ("in-flight", po::value(&in_flight)->default_value(in_flight), "micro-batches in flight in the pipeline")
        ("checkpoint-dir", po::value(&checkpoint_dir), "calibration checkpoints (default: <out>.calib)")
        ("checkpoint-every", po::value(&checkpoint_every)->default_value(checkpoint_every), "micro-batches between calibration checkpoints (0: only on SIGUSR1/SIGTERM)")
        ("resume", po::value(&resume)->default_value(resume), "auto (continue from the newest checkpoint if any) | never | must")
        ("dtype", po::value(&dtype)->default_value(dtype), "compute dtype: auto (the checkpoint's), float32, bfloat16, float16 (salience always accumulates in float32)");
  }
  // Everything that changes what calibration computes (the world size does not).
  json fingerprint_options() const {
    const ProfilerOptions p = options();
    return {{"salience", salience}, {"candidates", p.candidates}, {"fire_fraction", p.fire_fraction},
            {"early_stop", p.early_stop}, {"rho", p.rho}, {"check_every", p.check_every},
            {"min_sequences", p.min_sequences}, {"sample_per_linear", p.sample_per_linear}, {"sample_seed", p.seed},
            {"samples", samples}, {"seq_len", seq_len}, {"sampling", sampling}, {"seed", seed},
            {"batch_size", batch_size}, {"in_flight", in_flight}, {"dtype", dtype}};
  }
  ProfilerOptions options() const {
    ProfilerOptions p;
    p.kind = parse_salience_kind(salience);
    p.candidates = candidates;
    p.rho = rho;
    p.early_stop = rho <= 1.0;
    return p;
  }
};

// Options of stage 2.
struct SolveArgs {
  std::string bit_options = "2,4,8,16", solver = "lagrangian", target_kind = "total";
  double target = 0, clique_threshold = 0.85;
  std::int64_t group_size = 128;

  void add(po::options_description& o) {
    o.add_options()
        ("target-bits", po::value(&target)->required(), "average bits per decoder weight")
        ("target", po::value(&target_kind)->default_value(target_kind), "what --target-bits counts: total (codes + scales, zero-points, maps) or payload (codes only)")
        ("bit-options", po::value(&bit_options)->default_value(bit_options), "allowed bits, any of 1,2,3,4,8,16")
        ("group-size", po::value(&group_size)->default_value(group_size), "weights per scale along the input dimension (-1: whole row)")
        ("clique-threshold", po::value(&clique_threshold)->default_value(clique_threshold), "Jaccard similarity that joins a channel to a clique")
        ("solver", po::value(&solver)->default_value(solver), "lagrangian | threshold");
  }
  SolverOptions options(bool rtn) const {
    if (target_kind != "total" && target_kind != "payload") throw UsageError{"--target must be total or payload"};
    SolverOptions s;
    s.kind = rtn ? SolverKind::kUniform : parse_solver_kind(solver);
    s.bit_options = parse_bit_options(bit_options);
    s.target_bits = target;
    s.target_is_total = target_kind == "total";
    s.group_size = group_size;
    return s;
  }
};

// Refuses a bad target from the config alone, before loading weights or calibrating.
void check_target(const ModelConfig& config, const SolverOptions& sopt) {
  std::vector<std::pair<std::int64_t, std::int64_t>> shapes;
  for (std::int64_t l = 0; l < config.num_layers; ++l)
    for (const auto& s : linear_shapes(config)) shapes.push_back(s);
  check_target_reachable(shapes, sopt);
}

// Refuses (on every rank, before any work) outputs that exist without --overwrite and outputs
// that are one of the inputs.
void check_outputs(bool overwrite, std::initializer_list<std::string> paths,
                   std::initializer_list<std::string> inputs) {
  namespace fs = std::filesystem;
  for (const auto& p : paths) {
    if (p.empty()) continue;
    for (const auto& in : inputs) {
      std::error_code ec;
      CSAQ_CHECK(in.empty() || fs::weakly_canonical(p, ec) != fs::weakly_canonical(in, ec), "output '", p,
                 "' is the input '", in, "'; choose another output path");
    }
    storage::check_writable_target(p, overwrite);
  }
}

// Stage 1 on every rank, resuming from `checkpoints`' newest checkpoint as --resume says;
// returns the report fragment.
json profile_stage(const ModelShard& model, Profiler& profiler, const ProfileArgs& a, const std::string& model_dir,
                   const std::string& out, Communicator& comm, std::unique_ptr<CalibrationCheckpointer>& checkpoints) {
  const auto t = Clock::now();
  TokenSequences data = load_sequences(a.calib, tokenizer_in(a.tokenizer.empty() ? model_dir : a.tokenizer), a.seq_len, a.samples,
                                       parse_sampling(a.sampling), a.seed);
  data.check_vocabulary(model.config().vocab_size);
  checkpoints = std::make_unique<CalibrationCheckpointer>(
      a.checkpoint_dir.empty() ? out + ".calib" : a.checkpoint_dir, a.checkpoint_every,
      calibration_fingerprint(model_dir, data, a.fingerprint_options()), comm);
  const ResumePoint start = checkpoints->resume(a.resume, profiler);
  Pipeline pipeline(model, comm, PipelineOptions{a.batch_size, a.in_flight});
  ProgressMeter progress("profile", "batches", pipeline.micro_batches(data), comm.rank() == 0, 1.0,
                         start.micro_batch);
  const LossTotals totals =
      profiler.stopped_early()
          ? start.totals
          : pipeline.calibrate(data, profiler.gradient_callback(), &profiler.observer(), {},
                               progress.callback(),
                               checkpoints->round_callback(profiler), start);
  json checks = json::array();
  for (const auto& c : profiler.early_stop_checks()) checks.push_back({{"sequences", c.sequences}, {"rho", c.rho}});
  if (comm.rank() == 0) {
    const auto& last = profiler.early_stop_checks();
    std::fprintf(stderr, "[profile] %s %lld of %lld sequences", profiler.stopped_early() ? "stopped early after" : "used",
                 static_cast<long long>(totals.sequences), static_cast<long long>(data.size()));
    if (!last.empty()) std::fprintf(stderr, "; salience rank correlation %.4f (stop at %.4f)", last.back().rho, a.rho);
    std::fprintf(stderr, "\n");
  }
  return {{"salience", a.salience},
          {"early_stop", {{"sequences_used", totals.sequences},
                          {"sequences_available", data.size()},
                          {"stopped_early", profiler.stopped_early()},
                          {"rho", profiler.early_stop_checks().empty() ? json(nullptr) : json(profiler.early_stop_checks().back().rho)},
                          {"rho_threshold", a.rho},
                          {"checks", checks}}},
          {"calibration", {{"data", a.calib}, {"seq_len", a.seq_len}, {"sampling", a.sampling}, {"seed", a.seed},
                           {"mean_nll", totals.mean_nll()},
                           {"tokens", totals.sequences * a.seq_len}}},
          {"agreement_top5", top_fraction_agreement(profiler, SalienceKind::kCausal, SalienceKind::kActivation, 0.05, comm)},
          {"profile_s", seconds_since(t)}};
}

// Stage 2 on every rank: units from the profiler's cliques (none for rtn), then the solver.
Plan solve_stage(const ModelShard& model, const Profiler* profiler, SalienceKind kind, const SolverOptions& sopt,
                 double clique_threshold, Communicator& comm, json& report) {
  const auto t = Clock::now();
  std::vector<LinearInput> inputs;
  for (const DecoderLayer& layer : model.decoder())
    for (int i = 0; i < kNumLinears; ++i) {
      LinearInput in{layer.index, i, layer.linears[i].weight.detach(), {}, {}};
      if (profiler != nullptr) {
        in.salience = profiler->salience(layer.index, i, kind);
        in.row_leader = profiler->row_leaders(layer.index, i, clique_threshold);
      } else {
        in.row_leader = at::arange(in.weight.size(0), at::kLong);
      }
      inputs.push_back(std::move(in));
    }
  ProgressMeter progress("solve", "linears", static_cast<std::int64_t>(inputs.size()), comm.rank() == 0);
  const Plan plan = solve(inputs, model.config().num_layers, comm, sopt, progress.callback());
  const PlanSummary& s = plan.summary;
  if (comm.rank() == 0)
    std::fprintf(stderr, "[solve] %lld units, %.4f total bits per weight (%.4f payload), target %.4f %s\n",
                 static_cast<long long>(s.units), s.total_per_weight(), s.payload_per_weight(), sopt.target_bits,
                 sopt.target_is_total ? "total" : "payload");
  json histogram = json::object();
  for (const auto& [bits, weights] : s.histogram) histogram[std::to_string(bits)] = weights;
  report["bits"] = {{"target", sopt.target_bits},
                    {"target_counts", sopt.target_is_total ? "total" : "payload"},
                    {"total_per_weight", s.total_per_weight()},
                    {"payload_per_weight", s.payload_per_weight()},
                    {"histogram", histogram},
                    {"per_layer_total", s.layer_total_bits},
                    {"weights", s.weights},
                    {"total_bits", s.total_bits},
                    {"budget_bits", s.budget_bits},
                    {"options", sopt.bit_options},
                    {"group_size", sopt.group_size}};
  const ModelConfig& c = model.config();
  const std::uint64_t vh = static_cast<std::uint64_t>(c.vocab_size) * c.hidden_size;
  report["unquantized"] = {{"embedding_and_lm_head_parameters", c.tie_word_embeddings ? vh : 2 * vh},
                           {"bits", c10::elementSize(checkpoint_dtype(c)) * 8}};
  report["solver"] = {{"kind", solver_kind_name(sopt.kind)}, {"lambda", s.lambda}, {"units", s.units}};
  report["cliques"] = clique_stats(plan, comm);
  report["cliques"]["threshold"] = clique_threshold;
  report["time_s"]["solve"] = seconds_since(t);
  return plan;
}

void pack_stage(const std::string& out, const std::string& model_dir, const ModelShard& model, const Plan& plan,
                std::int64_t group_size, json& report, const std::string& report_path, bool overwrite,
                Communicator& comm, Clock::time_point start) {
  const auto t = Clock::now();
  ProgressMeter progress("pack", "linears", static_cast<std::int64_t>(plan.linears.size()), comm.rank() == 0);
  write_checkpoint(out, model, plan, group_size, report.dump(2), checkpoint_dtype(model.config()),
                   read_model_files(model_dir, comm), comm, overwrite, progress.callback());
  report["time_s"]["pack"] = seconds_since(t);
  report["time_s"]["total"] = seconds_since(start);
  if (comm.rank() == 0) {
    std::printf("wrote %s\n", out.c_str());
    if (!report_path.empty()) storage::write_file_atomic(report_path, report.dump(2) + "\n", overwrite);
  }
}

json base_report(const std::string& command, const std::string& model_dir, Communicator& comm) {
  return {{"command", command}, {"csaq_version", CSAQ_VERSION}, {"model", model_dir}, {"world_size", comm.size()},
          {"time_s", json::object()}};
}

}  // namespace

int run_quantize(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_dir, out, report_path, method = "csaq";
  int threads = 0;
  ProfileArgs pa;
  SolveArgs sa;
  po::options_description options("csaq quantize options");
  options.add_options()("model", po::value(&model_dir)->required(), "Hugging Face model directory");
  pa.add(options);
  sa.add(options);
  options.add_options()
      ("method", po::value(&method)->default_value(method), "csaq (salience-driven bits) | rtn (uniform round-to-nearest, no calibration)")
      ("out", po::value(&out)->required(), "checkpoint to write (HDF5)")
      ("report", po::value(&report_path), "also write the JSON report here")
      ("overwrite", "replace existing --out / --report")
      ("threads", po::value(&threads)->default_value(threads), "intra-op threads per rank (0: cores / ranks on the node)");
  po::variables_map vm;
  if (!parse_options("quantize", options, args, vm, comm)) return 0;
  if (method != "csaq" && method != "rtn") throw UsageError{"--method must be csaq or rtn"};
  if (method == "csaq" && pa.calib.empty()) throw UsageError{"--calib is required for --method csaq"};
  const bool overwrite = vm.count("overwrite") > 0, rtn = method == "rtn";
  check_outputs(overwrite, {out, report_path}, {model_dir, pa.calib, pa.tokenizer});
  set_threads(threads, comm);
  const auto start = Clock::now();
  const SolverOptions sopt = sa.options(rtn);
  const ProfilerOptions popt = pa.options();
  if (!rtn) install_preemption_handlers();  // calibration can stop and resume; RTN simply restarts
  const ModelConfig config = ModelConfig::load(model_dir);
  check_target(config, sopt);

  ModelShard model = load_model_shard(model_dir, comm.rank(), comm.size(), compute_dtype(pa.dtype, config));
  json report = base_report("quantize", model_dir, comm);
  report["method"] = method;
  report["time_s"]["load"] = seconds_since(start);
  Profiler profiler(model, comm, popt);
  std::unique_ptr<CalibrationCheckpointer> checkpoints;
  if (!rtn) {
    json part = profile_stage(model, profiler, pa, model_dir, out, comm, checkpoints);
    report["time_s"]["profile"] = part["profile_s"];
    part.erase("profile_s");
    report.update(part);
    checkpoints->stop_if_preempted(profiler);
  }
  const Plan plan = solve_stage(model, rtn ? nullptr : &profiler, popt.kind, sopt, sa.clique_threshold, comm, report);
  if (checkpoints) checkpoints->stop_if_preempted(profiler);
  pack_stage(out, model_dir, model, plan, sopt.group_size, report, report_path, overwrite, comm, start);
  if (checkpoints) checkpoints->remove_all();
  return 0;
}

int run_profile(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_dir, out;
  int threads = 0;
  ProfileArgs pa;
  po::options_description options("csaq profile options");
  options.add_options()("model", po::value(&model_dir)->required(), "Hugging Face model directory");
  pa.add(options);
  options.add_options()
      ("out", po::value(&out)->required(), "salience file to write (HDF5)")
      ("overwrite", "replace an existing --out")
      ("threads", po::value(&threads)->default_value(threads), "intra-op threads per rank (0: cores / ranks on the node)");
  po::variables_map vm;
  if (!parse_options("profile", options, args, vm, comm)) return 0;
  if (pa.calib.empty()) throw UsageError{"--calib is required"};
  const bool overwrite = vm.count("overwrite") > 0;
  check_outputs(overwrite, {out}, {model_dir, pa.calib, pa.tokenizer});
  set_threads(threads, comm);
  install_preemption_handlers();
  ModelShard model = load_model_shard(model_dir, comm.rank(), comm.size(),
                                      compute_dtype(pa.dtype, ModelConfig::load(model_dir)));
  Profiler profiler(model, comm, pa.options());
  json report = base_report("profile", model_dir, comm);
  std::unique_ptr<CalibrationCheckpointer> checkpoints;
  report.update(profile_stage(model, profiler, pa, model_dir, out, comm, checkpoints));
  write_shared_h5(out, overwrite, comm, [&](storage::H5File& f) { profiler.save(f, comm, report.dump()); });
  checkpoints->remove_all();
  if (comm.rank() == 0) std::printf("wrote %s\n", out.c_str());
  return 0;
}

int run_solve(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_dir, profile_path, out;
  int threads = 0;
  SolveArgs sa;
  std::string salience = "causal";
  po::options_description options("csaq solve options");
  options.add_options()
      ("model", po::value(&model_dir)->required(), "Hugging Face model directory the salience file was made for")
      ("profile", po::value(&profile_path)->required(), "salience file from csaq profile")
      ("salience", po::value(&salience)->default_value(salience), "causal | fisher | activation | magnitude");
  sa.add(options);
  options.add_options()
      ("out", po::value(&out)->required(), "plan file to write (HDF5)")
      ("overwrite", "replace an existing --out")
      ("threads", po::value(&threads)->default_value(threads), "intra-op threads per rank (0: cores / ranks on the node)");
  po::variables_map vm;
  if (!parse_options("solve", options, args, vm, comm)) return 0;
  const bool overwrite = vm.count("overwrite") > 0;
  check_outputs(overwrite, {out}, {model_dir, profile_path});
  set_threads(threads, comm);
  const auto start = Clock::now();
  const SolverOptions sopt = sa.options(false);
  check_target(ModelConfig::load(model_dir), sopt);
  ModelShard model = load_model_shard(model_dir, comm.rank(), comm.size());
  const storage::H5File in = storage::H5File::open_read(profile_path);
  const json saved = json::parse(in.read_text("profile.json"));
  ProfilerOptions popt;
  popt.kind = parse_salience_kind(salience);
  popt.candidates = saved["options"]["candidates"];
  popt.fire_fraction = saved["options"]["fire_fraction"];
  Profiler profiler(model, comm, popt);
  profiler.load(in);
  json report = base_report("quantize", model_dir, comm);
  report["method"] = "csaq";
  for (const char* key : {"early_stop", "calibration", "agreement_top5"})
    if (saved.contains(key)) report[key] = saved[key];
  report["salience"] = salience;
  report["time_s"]["profile"] = saved.value("profile_s", 0.0);
  const Plan plan = solve_stage(model, &profiler, popt.kind, sopt, sa.clique_threshold, comm, report);
  report["time_s"]["total"] = seconds_since(start);
  write_shared_h5(out, overwrite, comm, [&](storage::H5File& f) { save_plan(f, plan, model.config(), report.dump(2), comm); });
  if (comm.rank() == 0) std::printf("wrote %s\n", out.c_str());
  return 0;
}

int run_pack(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_dir, plan_path, out, report_path;
  int threads = 0;
  po::options_description options("csaq pack options");
  options.add_options()
      ("model", po::value(&model_dir)->required(), "Hugging Face model directory the plan was made for")
      ("plan", po::value(&plan_path)->required(), "plan file from csaq solve")
      ("out", po::value(&out)->required(), "checkpoint to write (HDF5)")
      ("report", po::value(&report_path), "also write the JSON report here")
      ("overwrite", "replace existing --out / --report")
      ("threads", po::value(&threads)->default_value(threads), "intra-op threads per rank (0: cores / ranks on the node)");
  po::variables_map vm;
  if (!parse_options("pack", options, args, vm, comm)) return 0;
  const bool overwrite = vm.count("overwrite") > 0;
  check_outputs(overwrite, {out, report_path}, {model_dir, plan_path});
  set_threads(threads, comm);
  const auto start = Clock::now();
  ModelShard model = load_model_shard(model_dir, comm.rank(), comm.size());
  const storage::H5File in = storage::H5File::open_read(plan_path);
  const Plan plan = load_plan(in, model.config(), model.layers().begin, model.layers().end);
  json report = json::parse(in.read_text("report.json"));
  report["world_size"] = comm.size();
  pack_stage(out, model_dir, model, plan, report["bits"]["group_size"].get<std::int64_t>(), report, report_path,
             overwrite, comm, start);
  return 0;
}

}  // namespace csaq::cli
