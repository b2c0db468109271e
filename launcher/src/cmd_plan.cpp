// csaq plan: will a run fit, and how long will it take, from config.json and the options of
// the run alone: memory per rank and stage, files on disk, the smallest world size that fits,
// projected time. No weights are read and no other rank is needed.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "plan.h"
#include "stages.h"
#include "csaq/packer/checkpoint.h"
#include "csaq/storage/error.h"
#include "csaq/storage/files.h"

namespace csaq::cli {
namespace po = boost::program_options;
using nlohmann::json;

RunShape run_shape(const std::string& command, const std::string& method, const ProfileArgs& pa,
                   const FormatArgs& fa, const SolveArgs& sa, const ModelConfig& config, int world) {
  RunShape r;
  r.command = command;
  r.method = command == "profile" ? "csaq" : method;
  r.profiler = pa.options(r.gradients(), r.method);
  r.samples = pa.samples;
  r.seq_len = pa.seq_len;
  const PipelineOptions p = pa.pipeline_options(r.gradients(), world);
  r.batch_size = p.micro_batch_size;
  r.in_flight = p.in_flight;
  r.align = p.align;
  r.recompute = p.recompute;
  r.compute = compute_dtype(pa.dtype);
  r.stored = checkpoint_dtype(config);
  r.solver = command == "profile" ? SolverOptions{} : sa.options(r.method, fa);
  if (command == "profile") fa.apply(r.solver);
  return r;
}

namespace {

// FLOP/s per stage.
struct Rates {
  double calibration = 0, solve = 0, pack = 0;
};

// The rates of an earlier run's report: each stage's FLOPs (its critical path for
// calibration) over its measured seconds; 0 where the report has no time for a stage.
Rates rates_from_report(const std::string& path) {
  json r;
  try {
    r = json::parse(storage::read_text_file(path));
  } catch (const json::exception& e) {
    CSAQ_FAIL("--rate-from '", path, "': not JSON: ", e.what());
  }
  CSAQ_CHECK(r.contains("work") && r.contains("time_s"), "--rate-from '", path,
             "' is not the report of a csaq quantize run by this version (it has no \"work\")");
  const json& w = r["work"];
  const json& t = r["time_s"];
  Rates rates;
  auto rate = [&](const char* flops, double seconds) { return seconds > 0 ? w.value(flops, 0.0) / seconds : 0.0; };
  if (t.contains("calibration_pass")) rates.calibration = rate("calibration_critical_flops", t["calibration_pass"].value("seconds", 0.0));
  rates.solve = rate("solve_flops_slowest_rank", t.value("solve", 0.0));
  rates.pack = rate("pack_flops_slowest_rank", t.value("pack", 0.0));
  return rates;
}

std::string count_text(double n) {
  char buf[32];
  if (n >= 1e9) std::snprintf(buf, sizeof(buf), "%.1f B", n / 1e9);
  else if (n >= 1e6) std::snprintf(buf, sizeof(buf), "%.1f M", n / 1e6);
  else std::snprintf(buf, sizeof(buf), "%.0f", n);
  return buf;
}

std::string duration(double s) {
  char buf[64];
  if (s < 120) std::snprintf(buf, sizeof(buf), "%.0f s", s);
  else if (s < 7200) std::snprintf(buf, sizeof(buf), "%.1f min", s / 60);
  else std::snprintf(buf, sizeof(buf), "%.1f h", s / 3600);
  return buf;
}

}  // namespace

int run_plan(const std::vector<std::string>& args, Communicator& comm) {
  std::string model_dir, config_path, device_memory, rate_from, command = "quantize", method = "csaq";
  int world = 1;
  double tflops = 0;
  ProfileArgs pa;
  FormatArgs fa;
  SolveArgs sa;
  sa.target = 4.0;
  po::options_description options("csaq plan options (and those of quantize that change memory or time)");
  options.add_options()
      ("model", po::value(&model_dir), "Hugging Face model directory (config.json and the safetensors headers are read)")
      ("config", po::value(&config_path), "a config.json alone")
      ("world-size", po::value(&world)->default_value(world), "ranks of the planned run")
      ("device-memory", po::value(&device_memory), "memory each rank may use, e.g. 80GiB, 141GB, 512G: says whether the run fits and the smallest world size that does")
      ("command", po::value(&command)->default_value(command), "quantize | profile")
      ("method", po::value(&method)->default_value(method), "csaq | gptq | rtn (as quantize)")
      ("tflops", po::value(&tflops), "sustained TFLOP/s of one rank: projects the time of each stage")
      ("rate-from", po::value(&rate_from), "the --report of an earlier csaq quantize run: projects time at its measured rates")
      ("json", "print the plan as JSON");
  pa.add(options);
  fa.add(options);
  sa.add(options, false);
  // Options quantize takes that change neither memory nor time are accepted, so that a
  // quantize command line can be planned by changing its first word.
  std::string ignored;
  options.add_options()
      ("out", po::value(&ignored), "ignored")
      ("report", po::value(&ignored), "ignored")
      ("overwrite", "ignored")
      ("threads", po::value(&ignored), "ignored");
  po::variables_map vm;
  if (!parse_options("plan", options, args, vm, comm)) return 0;
  if (model_dir.empty() == config_path.empty()) throw UsageError{"give one of --model DIR and --config FILE"};
  if (command != "quantize" && command != "profile") throw UsageError{"--command must be quantize or profile"};
  if (method != "csaq" && method != "rtn" && method != "gptq") throw UsageError{"--method must be csaq, gptq or rtn"};
  if (world < 1) throw UsageError{"--world-size must be at least 1"};
  if (vm.count("tflops") && !(tflops > 0)) throw UsageError{"--tflops must be positive"};
  const std::int64_t budget = device_memory.empty() ? 0 : parse_bytes(device_memory, "--device-memory");

  // The same checks and messages as quantize: config.json (and, with --model, the tensor
  // names of the safetensors headers) before anything is sized from it.
  const ModelConfig config = model_dir.empty()
                                 ? ModelConfig::parse(storage::read_text_file(config_path), config_path)
                                 : model_config(model_dir, comm);
  const RunShape shape = run_shape(command, method, pa, fa, sa, config, world);
  if (command == "quantize") check_target(config, shape.solver);
  const RunPlan plan = plan_run(config, world, shape);

  auto smallest_for = [&](const ProfileArgs& args) {
    for (int w = 1; w <= config.num_layers; ++w)
      if (plan_run(config, w, run_shape(command, method, args, fa, sa, config, w)).peak() <= budget) return w;
    return 0;
  };
  const int smallest = budget > 0 ? smallest_for(pa) : 0;
  // The memory options this run does not use yet, alone and together: their peak at this
  // world size and the smallest world size that fits with them.
  json lower = json::array();
  if (budget > 0 && plan.peak() > budget) {
    ProfileArgs recompute = pa, bf16 = pa;
    recompute.recompute = true;
    bf16.dtype = "bfloat16";
    ProfileArgs both = recompute;
    both.dtype = bf16.dtype;
    std::vector<std::pair<std::string, ProfileArgs>> variants;
    if (!pa.recompute && shape.gradients()) variants.emplace_back("--recompute", recompute);
    if (shape.compute == at::kFloat) variants.emplace_back("--dtype bfloat16", bf16);
    if (variants.size() == 2) variants.emplace_back("--recompute --dtype bfloat16", both);
    for (const auto& [flags, args] : variants) {
      const std::int64_t peak = plan_run(config, world, run_shape(command, method, args, fa, sa, config, world)).peak();
      const int w = smallest_for(args);
      lower.push_back({{"options", flags}, {"peak_bytes", peak}, {"fits", peak <= budget},
                       {"smallest_world_size_that_fits", w > 0 ? json(w) : json(nullptr)}});
    }
  }

  json times = nullptr;
  if (tflops > 0 || !rate_from.empty()) {
    // The report's rate for each stage it timed, --tflops for the others.
    Rates rates = rate_from.empty() ? Rates{} : rates_from_report(rate_from);
    for (double* r : {&rates.calibration, &rates.solve, &rates.pack})
      if (!(*r > 0)) *r = tflops * 1e12;
    auto project = [](double flops, double rate) { return rate > 0 ? json(flops / rate) : json(nullptr); };
    const bool quantize = command == "quantize";
    times = {{"calibration_s", project(plan.work.calibration_critical, rates.calibration)},
             {"solve_s", quantize ? project(plan.work.solve_critical(), rates.solve) : json(nullptr)},
             {"pack_s", quantize ? project(plan.work.pack_critical(), rates.pack) : json(nullptr)},
             {"rates_flop_per_s", {{"calibration", rates.calibration}, {"solve", rates.solve}, {"pack", rates.pack}}},
             {"rates_from", rate_from.empty() ? json("--tflops") : json(rate_from)}};
  }
  const std::vector<std::string> assumptions = {
      "layers compute on the CPU in this build: every tensor below is in the memory of the rank's process",
      "compute dtype " + std::string(dtype_name(shape.compute)) + " (--dtype " + pa.dtype + "), statistics in float32",
      "calibration runs all " + std::to_string(pa.samples) + " sequences; early stopping may end it after " +
          std::to_string(ProfilerOptions{}.min_sequences) + " or more",
      "the output holds every Linear at the target bits at most (the solver never exceeds it)",
      "time: FLOPs (6 per decoder weight and token with gradients, 8 with --recompute, attention on the full square, Hessians, the GPTQ and cost products per format) at one sustained rate per stage; elementwise work counted as 10 FLOPs per weight per clip step",
      "pipeline: rounds of " + std::to_string(plan.round_size) + " micro-batches take round + ranks - 1 steps of the slowest rank"};

  json out = plan_json(plan);
  out["model"] = model_dir.empty() ? config_path : model_dir;
  out["world_size"] = world;
  out["command"] = command;
  out["method"] = shape.method;
  out["compute_dtype"] = dtype_name(shape.compute);
  out["device_memory_bytes"] = budget > 0 ? json(budget) : json(nullptr);
  out["fits"] = budget > 0 ? json(plan.peak() <= budget) : json(nullptr);
  out["smallest_world_size_that_fits"] = budget > 0 ? (smallest > 0 ? json(smallest) : json(nullptr)) : json(nullptr);
  out["with_memory_options"] = lower;
  out["time"] = times;
  out["assumptions"] = assumptions;
  if (comm.rank() != 0) return 0;
  if (vm.count("json")) {
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  const auto& c = config;
  std::printf("csaq plan: %s %s, %lld layers, %s decoder Linear weights (%s parameters) on %d rank(s)\n",
              c.model_type.c_str(), out["model"].get<std::string>().c_str(), static_cast<long long>(c.num_layers),
              count_text(static_cast<double>(plan.decoder_weights)).c_str(),
              count_text(static_cast<double>(plan.parameters)).c_str(), world);
  std::printf("%s --method %s --objective %s --salience %s, %s compute, %lld x %lld tokens per micro-batch, %lld in flight, "
              "%lld sequences\n\n",
              command.c_str(), shape.method.c_str(), pa.objective.c_str(), salience_kind_name(pa.kind()), dtype_name(shape.compute),
              static_cast<long long>(shape.batch_size), static_cast<long long>(shape.seq_len),
              static_cast<long long>(shape.in_flight), static_cast<long long>(pa.samples));
  std::printf("%-5s %-9s %10s %12s %10s %10s %11s %10s %10s  %s\n", "rank", "layers", "weights", "accumulators",
              "Hessians", "co-act", "activations", "transient", "peak", "(stage)");
  for (const auto& m : plan.ranks) {
    const std::int64_t transient = std::max({m.backward, m.solve_work, m.pack_work + m.packed, m.load_mapping, m.save_work});
    char layers[32];
    std::snprintf(layers, sizeof(layers), "%lld-%lld", static_cast<long long>(m.layers.begin), static_cast<long long>(m.layers.end - 1));
    std::printf("%-5d %-9s %10s %12s %10s %10s %11s %10s %10s  %s\n", m.rank, layers, format_bytes(m.weights).c_str(),
                format_bytes(m.accumulators).c_str(), format_bytes(m.hessians).c_str(), format_bytes(m.coactivation).c_str(),
                format_bytes(m.activations).c_str(), format_bytes(transient).c_str(), format_bytes(m.peak).c_str(),
                m.peak_stage.c_str());
  }
  std::printf("\npeak: %s per rank (largest)", format_bytes(plan.peak()).c_str());
  if (budget > 0) {
    std::printf("; %s in %s", plan.peak() <= budget ? "fits" : "does NOT fit", format_bytes(budget).c_str());
    if (smallest > 0) std::printf("; the smallest world size that fits: %d", smallest);
    else std::printf("; no world size up to %lld fits", static_cast<long long>(c.num_layers));
    for (const auto& l : lower) {
      std::printf("\n  with %s: %s per rank, %s", l["options"].get<std::string>().c_str(),
                  format_bytes(l["peak_bytes"].get<double>()).c_str(), l["fits"].get<bool>() ? "fits" : "does not fit");
      if (!l["smallest_world_size_that_fits"].is_null())
        std::printf("; the smallest world size that fits: %d", l["smallest_world_size_that_fits"].get<int>());
    }
  }
  if (command == "quantize")
    std::printf("\ndisk: calibration checkpoint %s each (two at most while one is written), output at most %s\n",
                format_bytes(plan.checkpoint_bytes).c_str(), format_bytes(plan.output_bytes).c_str());
  else
    std::printf("\ndisk: the salience file %s (calibration checkpoints as large, two at most while one is written)\n",
                format_bytes(plan.checkpoint_bytes).c_str());
  if (!times.is_null()) {
    std::printf("time (%s):", rate_from.empty() ? "--tflops" : ("rates of " + rate_from).c_str());
    for (const char* k : {"calibration_s", "solve_s", "pack_s"})
      if (!times[k].is_null()) std::printf(" %s %s", std::string(k).substr(0, std::string(k).size() - 2).c_str(),
                                           duration(times[k].get<double>()).c_str());
    std::printf("\n");
  }
  std::printf("assumptions:\n");
  for (const auto& a : assumptions) std::printf("  - %s\n", a.c_str());
  return 0;
}

}  // namespace csaq::cli
