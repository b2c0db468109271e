// Options and helpers the stage commands (quantize, profile, solve, pack, check-costs) share.
#pragma once

#include <boost/program_options.hpp>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <cmath>

#include "commands.h"
#include "csaq/profiler/profiler.h"
#include "csaq/shard/pipeline.h"
#include "csaq/solver/solver.h"

namespace csaq::cli {

// The formats a run may choose from and the quantizer that makes them.
struct FormatArgs {
  std::string bit_options = "2,3,4,8", group_options = "32,128", quantizer = "gptq";
  int refine_sweeps = -1;  // -1: the method's default
  void add(boost::program_options::options_description& o);
  // Sets the formats and the quantizer of `s` for `method` (csaq, gptq or rtn: the uniform
  // baselines run as their own tools do, without refinement, unless asked); throws
  // UsageError on bad values.
  void apply(SolverOptions& s, const std::string& method = "csaq") const;
};

nlohmann::json quantizer_json(const QuantizerOptions& q, bool hessian);
QuantizerOptions quantizer_from_json(const nlohmann::json& j);

// The (bits, group option) pairs of the options, in the order reports and the
// post-quantization integral use; and, for a Linear with `in` inputs, the first pair that
// gives each of its formats.
std::vector<std::pair<int, std::int64_t>> option_pairs(const SolverOptions& s);
std::vector<std::size_t> pair_of_format(const std::vector<Format>& formats, std::int64_t in, const SolverOptions& s);

// A profiler restored from a salience file written by csaq profile (checked against the
// model), ranking by `kind`.
std::unique_ptr<Profiler> load_profile(const std::string& path, const ModelShard& model, Communicator& comm,
                                       SalienceKind kind);

// Refuses a bad target from the config alone, before loading weights or calibrating.
void check_target(const ModelConfig& config, const SolverOptions& sopt);

namespace po = boost::program_options;

// Options of stage 1.
struct ProfileArgs {
  std::string calib, tokenizer, sampling = "random", objective = "fidelity", salience = "auto", checkpoint_dir,
      resume = "auto", dtype = "auto";
  std::int64_t samples = 64, seq_len = 2048, batch_size = 1, in_flight = 0, candidates = 512, checkpoint_every = 32;
  std::int64_t pqi_samples = 8, pqi_points = 2;
  std::uint64_t seed = 0;
  double rho = 0.98;
  bool keep_all = false;  // every per-weight accumulator, whatever the cost model
  bool recompute = false;  // activation checkpointing per layer

  void add(po::options_description& o) {
    o.add_options()
        ("calib", po::value(&calib), "calibration text (.txt, .jsonl with a \"text\" field) or token ids (1-D .npy)")
        ("tokenizer", po::value(&tokenizer), "directory with tokenizer.json or tokenizer.model (default: --model)")
        ("sampling", po::value(&sampling)->default_value(sampling), "random (windows at seeded random offsets) | contiguous")
        ("seed", po::value(&seed)->default_value(seed), "seed of the random calibration windows")
        ("samples", po::value(&samples)->default_value(samples), "calibration sequences")
        ("seq-len", po::value(&seq_len)->default_value(seq_len), "tokens per calibration sequence")
        ("objective", po::value(&objective)->default_value(objective), "what a unit's cost predicts: fidelity (the increase of KL(P_original || P_quantized) on the calibration tokens: gradients of labels drawn from the model's own distribution) | calibration-loss (the increase of the calibration text's loss: gradients of its labels; adapts the model to that text)")
        ("salience", po::value(&salience)->default_value(salience), "cost model: auto (hessian for --objective fidelity, taylor for calibration-loss) | taylor | hessian | pqi | causal | fisher | activation | magnitude (docs/method-choices.md)")
        ("pqi-samples", po::value(&pqi_samples)->default_value(pqi_samples), "--salience pqi: calibration sequences per gradient pass")
        ("pqi-points", po::value(&pqi_points)->default_value(pqi_points), "--salience pqi: Gauss-Legendre points of the integral (1-3)")
        ("candidates", po::value(&candidates)->default_value(candidates), "co-activation channels tracked per Linear (K)")
        ("early-stop-rho", po::value(&rho)->default_value(rho), "stop calibrating once the tracked statistic's Spearman rho reaches this (> 1: never)")
        ("batch-size", po::value(&batch_size)->default_value(batch_size), "sequences per micro-batch")
        ("in-flight", po::value(&in_flight)->default_value(in_flight), "micro-batches in flight in the pipeline (0: 1 on one rank, else 4); does not change the result")
        ("keep-all-statistics", po::bool_switch(&keep_all), "keep every per-weight statistic (4 bytes per weight each), not only those of --salience: solve and check-costs can then use any cost model, and reports give agreement_top5")
        ("recompute", po::bool_switch(&recompute), "keep only each layer's input between forward and backward and run the layer's forward again in the backward pass: far less memory for activations, one more forward pass of compute; does not change the result")
        ("checkpoint-dir", po::value(&checkpoint_dir), "calibration checkpoints (default: <out>.calib)")
        ("checkpoint-every", po::value(&checkpoint_every)->default_value(checkpoint_every), "micro-batches between calibration checkpoints (0: only on SIGUSR1/SIGTERM)")
        ("resume", po::value(&resume)->default_value(resume), "auto (continue from the newest checkpoint if any) | never | must")
        ("dtype", po::value(&dtype)->default_value(dtype), "compute dtype: auto (the checkpoint's), float32, bfloat16, float16 (statistics always accumulate in float32)");
  }
  // The labels of the backward passes; throws UsageError naming the objectives.
  Labels labels() const {
    if (objective == "fidelity") return Labels::kSampled;
    if (objective == "calibration-loss") return Labels::kText;
    throw UsageError{"--objective must be fidelity or calibration-loss, not '" + objective + "'"};
  }
  // --salience with auto resolved by the objective. The first-order terms of taylor and pqi
  // follow the calibration text's gradient; under the fidelity objective the gradient of the
  // KL at the original weights is zero (the drawn labels' gradient is noise around it), so
  // they are refused there.
  SalienceKind kind() const {
    const bool fidelity = labels() == Labels::kSampled;
    if (salience == "auto") return fidelity ? SalienceKind::kHessian : SalienceKind::kTaylor;
    const SalienceKind k = parse_salience_kind(salience);
    if (fidelity && (k == SalienceKind::kTaylor || k == SalienceKind::kPqi))
      throw UsageError{"--salience " + salience + " prices a unit by the calibration text's loss (its first-order term "
                       "follows that text's gradient); use it with --objective calibration-loss, or --salience hessian "
                       "(the default) for --objective fidelity"};
    return k;
  }
  // Everything that changes what calibration computes (the world size does not).
  nlohmann::json fingerprint_options(bool gradients) const {
    const ProfilerOptions p = options(gradients);
    return {{"salience", salience_kind_name(p.kind)}, {"objective", gradients ? objective : std::string("none")},
            {"candidates", p.candidates}, {"fire_fraction", p.fire_fraction},
            {"early_stop", p.early_stop}, {"rho", p.rho}, {"check_every", p.check_every},
            {"min_sequences", p.min_sequences}, {"sample_per_linear", p.sample_per_linear}, {"sample_seed", p.seed},
            {"samples", samples}, {"seq_len", seq_len}, {"sampling", sampling}, {"seed", seed},
            {"batch_size", batch_size}, {"dtype", dtype}, {"gradients", gradients},
            {"keep_fisher", p.keep_fisher}, {"keep_grad_sum", p.keep_grad_sum}};
  }
  // One rank gains nothing from micro-batches in flight (they only let ranks overlap) and
  // holds their activations: 1 there. Rounds end at every early-stopping check, so checks
  // (and results) are the same for every in_flight and world size.
  PipelineOptions pipeline_options(bool gradients, int world) const {
    PipelineOptions p{batch_size, in_flight > 0 ? in_flight : (world == 1 ? 1 : 4), gradients};
    p.align = (ProfilerOptions{}.check_every + batch_size - 1) / batch_size;
    p.recompute = recompute;
    p.labels = labels();
    p.label_seed = seed;
    return p;
  }
  // `gradients` false: forward passes only (GPTQ needs only the input Hessians). `method`
  // rtn needs no Hessians; the uniform methods (gptq, rtn) no co-activation counters.
  ProfilerOptions options(bool gradients, const std::string& method = "csaq") const {
    if (samples < 1) throw UsageError{"--samples must be at least 1"};
    if (seq_len < 2) throw UsageError{"--seq-len must be at least 2 (a token and the next)"};
    if (batch_size < 1) throw UsageError{"--batch-size must be at least 1"};
    if (in_flight < 0) throw UsageError{"--in-flight must be 0 (automatic) or positive"};
    if (candidates < 1) throw UsageError{"--candidates must be at least 1"};
    if (checkpoint_every < 0) throw UsageError{"--checkpoint-every must be 0 (only on signals) or positive"};
    if (!(rho > -1.0)) throw UsageError{"--early-stop-rho must be above -1 (a rank correlation; > 1 never stops)"};
    if (pqi_samples < 1) throw UsageError{"--pqi-samples must be at least 1"};
    if (pqi_points < 1 || pqi_points > 3) throw UsageError{"--pqi-points must be 1, 2 or 3"};
    ProfilerOptions p;
    p.kind = kind();
    p.candidates = candidates;
    p.rho = rho;
    p.early_stop = gradients && rho <= 1.0;
    p.keep_for(p.kind, gradients);
    if (keep_all && gradients) p.keep_grad_sum = p.keep_causal = p.keep_fisher = true;
    p.hessians = method != "rtn";
    p.coactivation = method == "csaq";
    return p;
  }
};

// Options of stage 2.
struct SolveArgs {
  std::string solver = "lagrangian", target_kind = "total";
  double target = 0, clique_threshold = 0.85;

  // `target_required` false: --target-bits may be left out (csaq plan).
  void add(po::options_description& o, bool target_required = true) {
    auto* target_value = po::value(&target);
    if (target_required) target_value->required();
    o.add_options()
        ("target-bits", target_value, "average bits per decoder weight")
        ("target", po::value(&target_kind)->default_value(target_kind), "what --target-bits counts: total (everything stored) or payload (codes only)")
        ("clique-threshold", po::value(&clique_threshold)->default_value(clique_threshold), "Jaccard similarity that joins a channel to a clique (above 1: no cliques)")
        ("solver", po::value(&solver)->default_value(solver), "lagrangian | threshold");
  }
  // `method`: csaq (mixed formats), gptq or rtn (uniform).
  SolverOptions options(const std::string& method, const FormatArgs& formats) const {
    if (target_kind != "total" && target_kind != "payload") throw UsageError{"--target must be total or payload"};
    if (!(target > 0) || !std::isfinite(target)) throw UsageError{"--target-bits must be a positive number"};
    if (!(clique_threshold >= 0) || !std::isfinite(clique_threshold))
      throw UsageError{"--clique-threshold must be a Jaccard similarity, 0 to 1 (above 1: no cliques)"};
    SolverOptions s;
    formats.apply(s, method);
    s.kind = method == "csaq" ? parse_solver_kind(solver) : SolverKind::kUniform;
    if (method == "gptq") {
      if (formats.quantizer != "gptq") throw UsageError{"--method gptq quantizes with GPTQ; drop --quantizer " + formats.quantizer};
      s.quantizer.gptq = true;
    }
    if (method == "rtn") s.quantizer.gptq = false;
    s.target_bits = target;
    s.target_is_total = target_kind == "total";
    return s;
  }
};

struct RunShape;
// The run `command` (quantize or profile) with these options makes, on `world` ranks.
RunShape run_shape(const std::string& command, const std::string& method, const ProfileArgs& pa, const FormatArgs& fa,
                   const SolveArgs& sa, const ModelConfig& config, int world);

}  // namespace csaq::cli
