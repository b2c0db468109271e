// csaq quantize: profile (stage 1) -> solve (stage 2) -> pack (stage 3) in one run; and each
// stage alone: csaq profile (-> salience file), csaq solve (salience file -> plan file, any
// budget, no recomputation), csaq pack (plan file -> checkpoint).
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "calibration_checkpoint.h"
#include "commands.h"
#include "plan.h"
#include "stages.h"
#include "usage.h"
#include "csaq/packer/checkpoint.h"
#include "csaq/profiler/profiler.h"
#include "csaq/shard/phases.h"
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

}  // namespace

void FormatArgs::add(po::options_description& o) {
  o.add_options()
      ("bit-options", po::value(&bit_options)->default_value(bit_options), "allowed bits per weight, any of 1,2,3,4,8,16")
      ("group-options", po::value(&group_options)->default_value(group_options), "allowed weights per scale along a row (-1: whole rows); the solver picks one per unit")
      ("quantizer", po::value(&quantizer)->default_value(quantizer), "gptq (error compensation on the input Hessian) | rtn (round to nearest); both with clip search")
      ("refine-sweeps", po::value(&refine_sweeps), "coordinate-descent passes over the codes after GPTQ or rounding, against each row's output error on the input Hessian (default: 4 for --method csaq, 0 for the uniform baselines, which run as GPTQ and round-to-nearest tools do)");
}

void FormatArgs::apply(SolverOptions& s, const std::string& method) const {
  s.bit_options = parse_bit_options(bit_options);
  s.group_options = parse_group_options(group_options);
  if (quantizer != "gptq" && quantizer != "rtn") throw UsageError{"--quantizer must be gptq or rtn"};
  s.quantizer.gptq = quantizer == "gptq";
  if (refine_sweeps < -1) throw UsageError{"--refine-sweeps must be 0 or more"};
  s.quantizer.refine_sweeps = refine_sweeps >= 0 ? refine_sweeps : method == "csaq" ? 4 : 0;
}

json quantizer_json(const QuantizerOptions& q, bool hessian) {
  return {{"kind", q.gptq ? "gptq" : "rtn"}, {"hessian", hessian}, {"damp", q.damp}, {"act_order", q.act_order},
          {"block", q.block}, {"clip_steps", q.clip_steps}, {"max_shrink", q.max_shrink},
          {"refine_sweeps", q.refine_sweeps}};
}

QuantizerOptions quantizer_from_json(const json& j) {
  QuantizerOptions q;
  q.gptq = j.at("kind") == "gptq";
  q.damp = j.at("damp");
  q.act_order = j.at("act_order");
  q.block = j.at("block");
  q.clip_steps = j.at("clip_steps");
  q.max_shrink = j.at("max_shrink");
  q.refine_sweeps = j.value("refine_sweeps", 0);  // plans written before refinement existed
  return q;
}

std::vector<std::pair<int, std::int64_t>> option_pairs(const SolverOptions& s) {
  std::vector<std::pair<int, std::int64_t>> pairs;
  for (int b : s.bit_options) {
    if (b == 16) {
      pairs.emplace_back(16, 0);
      continue;
    }
    for (std::int64_t g : s.group_options) pairs.emplace_back(b, g);
  }
  return pairs;
}

std::vector<std::size_t> pair_of_format(const std::vector<Format>& formats, std::int64_t in, const SolverOptions& s) {
  const auto pairs = option_pairs(s);
  std::vector<std::size_t> out;
  for (const Format& f : formats) {
    std::size_t p = 0;
    while (p < pairs.size() &&
           !(pairs[p].first == f.bits && (f.bits == 16 || effective_group(in, pairs[p].second) == f.group)))
      ++p;
    CSAQ_ASSERT(p < pairs.size());
    out.push_back(p);
  }
  return out;
}

std::unique_ptr<Profiler> load_profile(const std::string& path, const ModelShard& model, Communicator& comm,
                                       SalienceKind kind) {
  const storage::H5File in = storage::H5File::open_read(path);
  CSAQ_CHECK(in.exists("profile.json"), "'", path, "' is not a csaq salience file (no profile.json)");
  const json saved = json::parse(in.read_text("profile.json"));
  ProfilerOptions popt;
  popt.kind = kind;
  popt.candidates = saved.at("options").at("candidates");
  popt.fire_fraction = saved.at("options").at("fire_fraction");
  popt.keep_grad_sum = popt.keep_causal = popt.keep_fisher = false;  // load() takes what the file holds
  auto profiler = std::make_unique<Profiler>(model, comm, popt);
  profiler->load(in);
  return profiler;
}

void check_target(const ModelConfig& config, const SolverOptions& sopt) {
  std::vector<std::pair<std::int64_t, std::int64_t>> shapes;
  for (std::int64_t l = 0; l < config.num_layers; ++l)
    for (const auto& s : linear_shapes(config)) shapes.push_back(s);
  check_target_reachable(shapes, sopt);
}

namespace {

// The post-quantization integral of every row in every option pair; Δ: the Linear's rows
// quantized in that format, each on its own parameters, as pack's quantizer would.
void pqi_stage(ModelShard& model, Profiler& profiler, const TokenSequences& data, const ProfileArgs& a,
               const SolverOptions& sopt, Communicator& comm) {
  const auto pairs = option_pairs(sopt);
  const std::int64_t n = std::min(a.pqi_samples, data.size());
  const TokenSequences subset(data.batch(0, n).reshape({-1}), data.seq_len(), -1, data.source());
  ProgressMeter progress("pqi", "passes", static_cast<std::int64_t>(pairs.size()) * a.pqi_points, comm.rank() == 0);
  GptqFactorCache cache;
  auto delta_of = [&](std::int64_t layer, int linear, std::size_t p) {
    const at::Tensor w = profiler.weights(layer, linear).weight.detach().to(at::kFloat);
    const Format f{pairs[p].first, pairs[p].first == 16 ? 0 : effective_group(w.size(1), pairs[p].second)};
    at::Tensor delta;
    for_each_format(w, at::arange(w.size(0), at::kLong), profiler.linear_hessian(layer, linear), {f}, sopt.quantizer,
                    [&](std::size_t, const Quantized& q) { delta = q.values - w; }, cache);
    return delta;
  };
  profiler.integrate_pqi(model, subset, a.pipeline_options(true, comm.size()), pairs.size(),
                         static_cast<int>(a.pqi_points), delta_of, progress.callback());
}


// Stage 1 on every rank, resuming from `checkpoints`' newest checkpoint as --resume says;
// `gradients` false runs forward passes only. The end of calibration is checkpointed when
// long work follows (quantize's solve and pack, the pqi passes), not when only writing the
// salience file does. Returns the report fragment.
json profile_stage(ModelShard& model, Profiler& profiler, const ProfileArgs& a, bool gradients, bool stages_follow,
                   const SolverOptions& sopt, const std::string& model_dir, const std::string& out, Communicator& comm,
                   std::unique_ptr<CalibrationCheckpointer>& checkpoints) {
  const auto t = Clock::now();
  TokenSequences data = load_sequences(a.calib, tokenizer_in(a.tokenizer.empty() ? model_dir : a.tokenizer), a.seq_len, a.samples,
                                       parse_sampling(a.sampling), a.seed);
  data.check_vocabulary(model.config().vocab_size);
  checkpoints = std::make_unique<CalibrationCheckpointer>(
      a.checkpoint_dir.empty() ? out + ".calib" : a.checkpoint_dir, a.checkpoint_every,
      calibration_fingerprint(model_dir, data, a.fingerprint_options(gradients), comm), comm,
      stages_follow || profiler.options().kind == SalienceKind::kPqi);
  const ResumePoint start = checkpoints->resume(a.resume, profiler);
  Pipeline pipeline(model, comm, a.pipeline_options(gradients, comm.size()));
  ProgressMeter progress("profile", "batches", pipeline.micro_batches(data), comm.rank() == 0, 1.0,
                         start.micro_batch);
  reset_phases();
  const auto t_pass = Clock::now();
  const LossTotals totals =
      profiler.stopped_early()
          ? start.totals
          : pipeline.calibrate(data, profiler.gradient_callback(), &profiler.observer(), {},
                               progress.callback(),
                               checkpoints->round_callback(profiler), start, &profiler.replay_observer());
  const double pass_s = seconds_since(t_pass);
  const json phases = phases_json(comm, pass_s);
  const std::int64_t pass_tokens = (totals.sequences - start.totals.sequences) * a.seq_len;
  json checks = json::array();
  for (const auto& c : profiler.early_stop_checks()) checks.push_back({{"sequences", c.sequences}, {"rho", c.rho}});
  if (comm.rank() == 0) {
    const auto& last = profiler.early_stop_checks();
    std::fprintf(stderr, "[profile] %s %lld of %lld sequences", profiler.stopped_early() ? "stopped early after" : "used",
                 static_cast<long long>(totals.sequences), static_cast<long long>(data.size()));
    if (!last.empty()) std::fprintf(stderr, "; rank correlation %.4f (stop at %.4f)", last.back().rho, a.rho);
    std::fprintf(stderr, "\n");
  }
  json part = {{"salience", salience_kind_name(profiler.options().kind)},
               {"objective", gradients ? json(a.objective) : json(nullptr)},
               {"gradients", gradients},
               {"early_stop", {{"sequences_used", totals.sequences},
                               {"sequences_available", data.size()},
                               {"stopped_early", profiler.stopped_early()},
                               {"rho", profiler.early_stop_checks().empty() ? json(nullptr) : json(profiler.early_stop_checks().back().rho)},
                               {"rho_threshold", a.rho},
                               {"checks", checks}}},
               {"calibration", {{"data", a.calib}, {"seq_len", a.seq_len}, {"sampling", a.sampling}, {"seed", a.seed},
                                {"mean_nll", totals.mean_nll()},
                                {"tokens", totals.sequences * a.seq_len}}},
               // Measured, not computed: under time_s in the report.
               {"calibration_pass", {{"tokens", pass_tokens}, {"seconds", pass_s},
                                     {"tokens_per_s", pass_s > 0 ? static_cast<double>(pass_tokens) / pass_s : 0.0},
                                     {"phases", phases}}}};
  // Needs the per-weight causal salience, kept only for --salience causal or hessian or with
  // --keep-all-statistics (4 bytes per weight).
  if (gradients && profiler.has_statistics_for(SalienceKind::kCausal))
    part["agreement_top5"] = top_fraction_agreement(profiler, SalienceKind::kCausal, SalienceKind::kActivation, 0.05, comm);
  if (profiler.options().kind == SalienceKind::kPqi) {
    checkpoints->stop_if_preempted(profiler);
    const auto tp = Clock::now();
    pqi_stage(model, profiler, data, a, sopt, comm);
    part["pqi"] = {{"bit_options", sopt.bit_options}, {"group_options", sopt.group_options},
                   {"quantizer", quantizer_json(sopt.quantizer, true)}, {"sequences", std::min(a.pqi_samples, data.size())},
                   {"points", a.pqi_points}, {"time_s", seconds_since(tp)}};
  }
  part["profile_s"] = seconds_since(t);
  return part;
}

// Stage 2 on every rank: units from the profiler's cliques (none for the uniform methods),
// each format's rows quantized as pack will, costs from the profiler's cost model.
Plan solve_stage(const ModelShard& model, const Profiler* profiler, SalienceKind kind, const SolverOptions& sopt,
                 double clique_threshold, Communicator& comm, json& report) {
  const auto t = Clock::now();
  const bool uniform = sopt.kind == SolverKind::kUniform;
  std::vector<LinearInput> inputs;
  for (const DecoderLayer& layer : model.decoder())
    for (int i = 0; i < kNumLinears; ++i) {
      LinearInput in{layer.index, i, layer.linears[i].weight.detach(), {}, {}, {}};
      const std::int64_t cols = in.weight.size(1);
      if (profiler != nullptr) in.hessian = [profiler, l = layer.index, i] { return profiler->linear_hessian(l, i); };
      if (profiler != nullptr && !uniform) {
        in.row_leader = profiler->row_leaders(layer.index, i, clique_threshold);
        const auto pair = pair_of_format(linear_formats(cols, sopt.bit_options, sopt.group_options), cols, sopt);
        in.cost = [profiler, kind, pair, l = layer.index, i](const at::Tensor& delta, std::size_t f) {
          return profiler->row_cost(l, i, kind, delta, kind == SalienceKind::kPqi ? pair[f] : f);
        };
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
  json histogram = json::object(), formats = json::object();
  for (const auto& [bits, weights] : s.histogram) histogram[std::to_string(bits)] = weights;
  for (const auto& [f, weights] : s.format_histogram)
    if (weights > 0) formats[f.bits == 16 ? "16" : std::to_string(f.bits) + "/g" + std::to_string(f.group)] = weights;
  report["bits"] = {{"target", sopt.target_bits},
                    {"target_counts", sopt.target_is_total ? "total" : "payload"},
                    {"total_per_weight", s.total_per_weight()},
                    {"payload_per_weight", s.payload_per_weight()},
                    {"histogram", histogram},
                    {"format_histogram", formats},
                    {"per_layer_total", s.layer_total_bits},
                    {"weights", s.weights},
                    {"total_bits", s.total_bits},
                    {"budget_bits", s.budget_bits},
                    {"options", sopt.bit_options},
                    {"group_options", sopt.group_options}};
  const ModelConfig& c = model.config();
  const std::uint64_t vh = static_cast<std::uint64_t>(c.vocab_size) * c.hidden_size;
  report["unquantized"] = {{"embedding_and_lm_head_parameters", c.tie_word_embeddings ? vh : 2 * vh},
                           {"bits", c10::elementSize(checkpoint_dtype(c)) * 8}};
  report["quantizer"] = quantizer_json(sopt.quantizer, profiler != nullptr);
  report["solver"] = {{"kind", solver_kind_name(sopt.kind)}, {"lambda", s.lambda}, {"units", s.units},
                      {"cost", uniform ? json(nullptr) : json(salience_kind_name(kind))},
                      {"predicted_cost", s.predicted_cost}};
  report["cliques"] = clique_stats(plan, comm);
  report["cliques"]["threshold"] = clique_threshold;
  report["time_s"]["solve"] = seconds_since(t);
  return plan;
}

void pack_stage(const std::string& out, const std::string& model_dir, const ModelShard& model, const Plan& plan,
                const Profiler* profiler, const QuantizerOptions& quantizer, json& report,
                const std::string& report_path, bool overwrite, Communicator& comm, Clock::time_point start) {
  const auto t = Clock::now();
  ProgressMeter progress("pack", "linears", static_cast<std::int64_t>(plan.linears.size()), comm.rank() == 0);
  HessianOf hessian_of;
  if (profiler != nullptr)
    hessian_of = [profiler](std::int64_t l, int i) { return profiler->linear_hessian(l, i); };
  write_checkpoint(out, model, plan, hessian_of, quantizer, report.dump(2), checkpoint_dtype(model.config()),
                   read_model_files(model_dir, comm), comm, overwrite, progress.callback());
  report["time_s"]["pack"] = seconds_since(t);
  report["time_s"]["total"] = seconds_since(start);
  end_stage("pack");
  report["memory"] = memory_json(comm);
  report["runtime"] = runtime_json();
  if (comm.rank() == 0) {
    std::printf("wrote %s\n", out.c_str());
    if (!report_path.empty()) storage::write_file_atomic(report_path, report.dump(2) + "\n", overwrite);
  }
}

// What csaq plan predicts for this run (the sequences it used), next to what it measured: the
// FLOPs of each stage, from which csaq plan --rate-from projects other runs, and the peak
// memory of each rank.
void add_planned(json& report, const ModelConfig& config, const RunShape& shape) {
  const std::int64_t used = report.contains("early_stop") ? report["early_stop"].value("sequences_used", shape.samples)
                                                          : shape.samples;
  const RunPlan p = plan_run(config, static_cast<int>(report["world_size"].get<int>()), shape, used);
  report["work"] = {{"calibration_critical_flops", p.work.calibration_critical},
                    {"solve_flops_slowest_rank", p.work.solve_critical()},
                    {"pack_flops_slowest_rank", p.work.pack_critical()}};
  json peaks = json::array();
  for (const auto& r : p.ranks) peaks.push_back(r.peak);
  report["planned_peak_bytes"] = peaks;
}

// Before any weight is read, rank 0 says what csaq plan predicts for this run, and warns
// when the ranks on its node would need more memory than the node (or the job's cgroup) has.
void announce_plan(const ModelConfig& config, const RunShape& shape, Communicator& comm) {
  if (comm.rank() != 0) return;
  const RunPlan p = plan_run(config, comm.size(), shape);
  const auto largest = std::max_element(p.ranks.begin(), p.ranks.end(),
                                        [](const RankMemory& a, const RankMemory& b) { return a.peak < b.peak; });
  const std::int64_t node = largest->peak * comm.local_size(), free = available_memory_bytes();
  std::fprintf(stderr, "[plan] peak %s per rank (rank %d, %s); %d rank(s) on this node, %s available\n",
               format_bytes(static_cast<double>(largest->peak)).c_str(), largest->rank, largest->peak_stage.c_str(),
               comm.local_size(), free > 0 ? format_bytes(static_cast<double>(free)).c_str() : "unknown");
  if (free > 0 && node > free)
    std::fprintf(stderr,
                 "warning: the plan puts this node's ranks at %s, more than the %s available: the run may be killed "
                 "for want of memory; `csaq plan` with the same options and --device-memory shows what --recompute, "
                 "--dtype bfloat16 or more ranks would need\n",
                 format_bytes(static_cast<double>(node)).c_str(), format_bytes(static_cast<double>(free)).c_str());
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
  FormatArgs fa;
  SolveArgs sa;
  po::options_description options("csaq quantize options");
  options.add_options()("model", po::value(&model_dir)->required(), "Hugging Face model directory");
  pa.add(options);
  fa.add(options);
  sa.add(options);
  options.add_options()
      ("method", po::value(&method)->default_value(method), "csaq (mixed formats by the cost model) | gptq (uniform GPTQ, forward passes only) | rtn (uniform round-to-nearest, no calibration)")
      ("out", po::value(&out)->required(), "checkpoint to write (HDF5)")
      ("report", po::value(&report_path), "also write the JSON report here")
      ("overwrite", "replace existing --out / --report")
      ("threads", po::value(&threads)->default_value(threads), "intra-op threads per rank (0: cores / ranks on the node)");
  po::variables_map vm;
  if (!parse_options("quantize", options, args, vm, comm)) return 0;
  if (method != "csaq" && method != "rtn" && method != "gptq") throw UsageError{"--method must be csaq, gptq or rtn"};
  const bool rtn = method == "rtn", gradients = method == "csaq";
  if (!rtn && pa.calib.empty()) throw UsageError{"--calib is required for --method " + method};
  const bool overwrite = vm.count("overwrite") > 0;
  check_outputs(comm, {{"--out", out}, {"--report", report_path}},
                {{"--model", model_dir}, {"--calib", pa.calib}, {"--tokenizer", pa.tokenizer}}, overwrite);
  set_threads(threads, comm);
  const auto start = Clock::now();
  const SolverOptions sopt = sa.options(method, fa);
  const ProfilerOptions popt = pa.options(gradients, method);
  if (!rtn) install_preemption_handlers();  // calibration can stop and resume; RTN simply restarts
  const ModelConfig config = model_config(model_dir, comm);
  check_target(config, sopt);
  if (!rtn) warn_if_beyond_positions(config, pa.seq_len, comm);
  announce_plan(config, run_shape("quantize", method, pa, fa, sa, config, comm.size()), comm);

  ModelShard model = load_model_shard(model_dir, comm.rank(), comm.size(), compute_dtype(pa.dtype));
  end_stage("load");
  json report = base_report("quantize", model_dir, comm);
  report["method"] = method;
  report["layer_partition"] = json::array();
  for (const auto& r : model.partition()) report["layer_partition"].push_back({r.begin, r.end});
  report["time_s"]["load"] = seconds_since(start);
  Profiler profiler(model, comm, popt);
  std::unique_ptr<CalibrationCheckpointer> checkpoints;
  if (!rtn) {
    json part = profile_stage(model, profiler, pa, gradients, true, sopt, model_dir, out, comm, checkpoints);
    end_stage("calibration");
    report["time_s"]["profile"] = part["profile_s"];
    report["time_s"]["calibration_pass"] = part["calibration_pass"];
    part.erase("profile_s");
    part.erase("calibration_pass");
    report.update(part);
    checkpoints->stop_if_preempted(profiler);
  }
  const Plan plan = solve_stage(model, rtn ? nullptr : &profiler, popt.kind, sopt, sa.clique_threshold, comm, report);
  end_stage("solve");
  add_planned(report, config, run_shape("quantize", method, pa, fa, sa, config, comm.size()));
  if (checkpoints) checkpoints->stop_if_preempted(profiler);
  pack_stage(out, model_dir, model, plan, rtn ? nullptr : &profiler, sopt.quantizer, report, report_path, overwrite,
             comm, start);
  if (checkpoints) checkpoints->remove_all();
  return 0;
}

int run_profile(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_dir, out, report_path;
  int threads = 0;
  ProfileArgs pa;
  FormatArgs fa;
  po::options_description options("csaq profile options");
  options.add_options()("model", po::value(&model_dir)->required(), "Hugging Face model directory");
  pa.add(options);
  fa.add(options);  // the formats the post-quantization integral (--salience pqi) is computed for
  options.add_options()
      ("out", po::value(&out)->required(), "salience file to write (HDF5)")
      ("report", po::value(&report_path), "also write the JSON report here")
      ("overwrite", "replace existing --out / --report")
      ("threads", po::value(&threads)->default_value(threads), "intra-op threads per rank (0: cores / ranks on the node)");
  po::variables_map vm;
  if (!parse_options("profile", options, args, vm, comm)) return 0;
  if (pa.calib.empty()) throw UsageError{"--calib is required"};
  const bool overwrite = vm.count("overwrite") > 0;
  check_outputs(comm, {{"--out", out}, {"--report", report_path}}, {{"--model", model_dir}, {"--calib", pa.calib}, {"--tokenizer", pa.tokenizer}},
                overwrite);
  set_threads(threads, comm);
  SolverOptions sopt;
  fa.apply(sopt);
  const ProfilerOptions popt = pa.options(true);
  install_preemption_handlers();
  const ModelConfig config = model_config(model_dir, comm);
  warn_if_beyond_positions(config, pa.seq_len, comm);
  announce_plan(config, run_shape("profile", "csaq", pa, fa, SolveArgs{}, config, comm.size()), comm);
  ModelShard model = load_model_shard(model_dir, comm.rank(), comm.size(), compute_dtype(pa.dtype));
  end_stage("load");
  Profiler profiler(model, comm, popt);
  json report = base_report("profile", model_dir, comm);
  std::unique_ptr<CalibrationCheckpointer> checkpoints;
  json part = profile_stage(model, profiler, pa, true, false, sopt, model_dir, out, comm, checkpoints);
  end_stage("calibration");
  report["time_s"]["calibration_pass"] = part["calibration_pass"];
  part.erase("calibration_pass");
  report.update(part);
  write_shared_h5(out, overwrite, comm, [&](storage::H5File& f) { profiler.save(f, comm, report.dump()); });
  checkpoints->remove_all();
  end_stage("save");
  report["memory"] = memory_json(comm);
  report["runtime"] = runtime_json();
  if (comm.rank() == 0) {
    std::printf("wrote %s\n", out.c_str());
    if (!report_path.empty()) storage::write_file_atomic(report_path, report.dump(2) + "\n", overwrite);
  }
  return 0;
}

int run_solve(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_dir, profile_path, out;
  int threads = 0;
  FormatArgs fa;
  SolveArgs sa;
  std::string salience = "auto";
  po::options_description options("csaq solve options");
  options.add_options()
      ("model", po::value(&model_dir)->required(), "Hugging Face model directory the salience file was made for")
      ("profile", po::value(&profile_path)->required(), "salience file from csaq profile")
      ("salience", po::value(&salience)->default_value(salience), "cost model: auto (the one the salience file was profiled for) | taylor | hessian | pqi | causal | fisher | activation | magnitude");
  fa.add(options);
  sa.add(options);
  options.add_options()
      ("out", po::value(&out)->required(), "plan file to write (HDF5)")
      ("overwrite", "replace an existing --out")
      ("threads", po::value(&threads)->default_value(threads), "intra-op threads per rank (0: cores / ranks on the node)");
  po::variables_map vm;
  if (!parse_options("solve", options, args, vm, comm)) return 0;
  const bool overwrite = vm.count("overwrite") > 0;
  check_outputs(comm, {{"--out", out}}, {{"--model", model_dir}, {"--profile", profile_path}}, overwrite);
  set_threads(threads, comm);
  const auto start = Clock::now();
  const SolverOptions sopt = sa.options("csaq", fa);
  check_target(model_config(model_dir, comm), sopt);
  ModelShard model = load_model_shard(model_dir, comm.rank(), comm.size());
  const json saved = json::parse(storage::H5File::open_read(profile_path).read_text("profile.json"));
  if (salience == "auto") salience = saved.value("salience", std::string("taylor"));
  const SalienceKind kind = parse_salience_kind(salience);
  if (kind == SalienceKind::kPqi) {
    CSAQ_CHECK(saved.contains("pqi"), "salience file '", profile_path,
               "' holds no post-quantization integral; profile with --salience pqi");
    CSAQ_CHECK(saved["pqi"]["bit_options"] == json(sopt.bit_options) && saved["pqi"]["group_options"] == json(sopt.group_options),
               "salience file '", profile_path, "' has the post-quantization integral for --bit-options ",
               saved["pqi"]["bit_options"].dump(), " --group-options ", saved["pqi"]["group_options"].dump(),
               "; solve with those");
  }
  std::unique_ptr<Profiler> profiler = load_profile(profile_path, model, comm, kind);
  json report = base_report("quantize", model_dir, comm);
  report["method"] = "csaq";
  for (const char* key : {"early_stop", "calibration", "agreement_top5", "pqi", "objective"})
    if (saved.contains(key)) report[key] = saved[key];
  report["salience"] = salience;
  report["time_s"]["profile"] = saved.value("profile_s", 0.0);
  const Plan plan = solve_stage(model, profiler.get(), kind, sopt, sa.clique_threshold, comm, report);
  report["time_s"]["total"] = seconds_since(start);
  write_shared_h5(out, overwrite, comm, [&](storage::H5File& f) { save_plan(f, plan, model.config(), report.dump(2), comm); });
  if (comm.rank() == 0) std::printf("wrote %s\n", out.c_str());
  return 0;
}

int run_pack(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_dir, plan_path, profile_path, out, report_path;
  int threads = 0;
  po::options_description options("csaq pack options");
  options.add_options()
      ("model", po::value(&model_dir)->required(), "Hugging Face model directory the plan was made for")
      ("plan", po::value(&plan_path)->required(), "plan file from csaq solve")
      ("profile", po::value(&profile_path), "salience file the plan was solved from (its input Hessians drive the quantizer)")
      ("out", po::value(&out)->required(), "checkpoint to write (HDF5)")
      ("report", po::value(&report_path), "also write the JSON report here")
      ("overwrite", "replace existing --out / --report")
      ("threads", po::value(&threads)->default_value(threads), "intra-op threads per rank (0: cores / ranks on the node)");
  po::variables_map vm;
  if (!parse_options("pack", options, args, vm, comm)) return 0;
  const bool overwrite = vm.count("overwrite") > 0;
  check_outputs(comm, {{"--out", out}, {"--report", report_path}},
                {{"--model", model_dir}, {"--plan", plan_path}, {"--profile", profile_path}}, overwrite);
  set_threads(threads, comm);
  const auto start = Clock::now();
  ModelShard model = load_model_shard(model_dir, comm.rank(), comm.size());
  const storage::H5File in = storage::H5File::open_read(plan_path);
  const Plan plan = load_plan(in, model.config(), model.layers().begin, model.layers().end);
  json report = json::parse(in.read_text("report.json"));
  report["world_size"] = comm.size();
  const QuantizerOptions quantizer = quantizer_from_json(report.at("quantizer"));
  std::unique_ptr<Profiler> profiler;
  if (report["quantizer"].value("hessian", false)) {
    if (profile_path.empty())
      throw UsageError{"the plan was solved with the input Hessians of a salience file; pass it as --profile"};
    profiler = load_profile(profile_path, model, comm, SalienceKind::kCausal);
  }
  pack_stage(out, model_dir, model, plan, profiler.get(), quantizer, report, report_path, overwrite, comm, start);
  return 0;
}

}  // namespace csaq::cli
