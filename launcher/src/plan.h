// What a csaq run will need before it starts: memory per rank and stage, files on disk, and
// time, from config.json and the run's options alone (no weights read). The memory model
// follows the code tensor by tensor; docs/planning.md lists every term and how it was checked
// against measured runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "csaq/profiler/profiler.h"
#include "csaq/shard/model.h"
#include "csaq/solver/solver.h"

namespace csaq::cli {

// What a run is asked to do, as quantize (or profile) will do it.
struct RunShape {
  std::string command = "quantize";  // quantize | profile
  std::string method = "csaq";       // csaq | gptq | rtn
  ProfilerOptions profiler;          // after keep_for: the accumulators the run keeps
  std::int64_t samples = 64, seq_len = 2048, batch_size = 1, in_flight = 1, align = 0;
  bool recompute = false;               // activation checkpointing per layer (--recompute)
  at::ScalarType compute = at::kFloat;  // weights and activations
  at::ScalarType stored = at::kFloat;   // the checkpoint's dtype (safetensors, dense output)
  SolverOptions solver;
  bool calibrates() const { return method != "rtn"; }
  bool gradients() const { return method == "csaq"; }
};

// Bytes of one rank. Resident terms stay for the whole run from the stage that makes them;
// transient ones exist only inside a stage.
struct RankMemory {
  int rank = 0;
  LayerRange layers;
  std::int64_t linear_weights = 0;  // decoder Linear weights on this rank (count)
  // resident
  std::int64_t weights = 0;        // parameters in the compute dtype
  std::int64_t accumulators = 0;   // per-weight statistics kept (grad_sum, causal, fisher) and per-row/column ones
  std::int64_t hessians = 0;       // input Hessians, float32, one triangle each (GramMatrix)
  std::int64_t coactivation = 0;   // co-activation counters
  std::int64_t packed = 0;         // the packed share of the output, held until it is written
  // transient
  std::int64_t load_mapping = 0;   // the safetensors pages of this rank's tensors while they are copied
  std::int64_t activations = 0;    // the saved tensors of `in_flight` micro-batches
  std::int64_t backward = 0;       // one layer's weight gradients and backward temporaries
  std::int64_t solve_work = 0;     // quantizing and costing the largest Linear in every format
  std::int64_t pack_work = 0;      // quantizing the largest Linear by its plan
  std::int64_t save_work = 0;      // the largest whole Hessian, made while statistics are written
  std::int64_t runtime = 0;        // BLAS buffers, thread pools, MPI and HDF5
  // Per stage: name and bytes over the process's start; the peak is the largest.
  std::vector<std::pair<std::string, std::int64_t>> stages;
  std::int64_t peak = 0;
  std::string peak_stage;
};

// Floating-point operations of one rank per stage, and the calibration's critical path: the
// pipeline runs rounds of m micro-batches through N ranks in (m + N - 1) steps of the slowest
// rank, so the calibration takes steps x (slowest rank's FLOPs per micro-batch).
struct Work {
  std::vector<double> calibration_per_rank;  // FLOPs of all micro-batches
  double calibration_critical = 0;           // FLOPs on the critical path (bubble included)
  std::vector<double> solve_per_rank;
  std::vector<double> pack_per_rank;
  double solve_critical() const;
  double pack_critical() const;
};

struct RunPlan {
  std::vector<RankMemory> ranks;
  Work work;
  std::int64_t micro_batches = 0, rounds = 0, round_size = 0;
  std::int64_t decoder_weights = 0, parameters = 0;
  std::int64_t checkpoint_bytes = 0;  // one calibration checkpoint (or the salience file)
  std::int64_t output_bytes = 0;      // the quantized checkpoint, at most
  std::int64_t peak() const;          // largest rank's
};

// The plan of `shape` on `world` ranks; the layer partition is partition_model's, the one
// load_model_shard uses. `sequences` overrides how many calibration sequences run (early
// stopping may end sooner than shape.samples; reports pass what was used).
RunPlan plan_run(const ModelConfig& config, int world, const RunShape& shape, std::int64_t sequences = -1);

// Saved-for-backward bytes of one decoder layer's forward pass for `batch` sequences of
// `seq_len` tokens in `dtype`, its input and output excluded (see ModelShard::layer_forward).
std::int64_t layer_activation_bytes(const ModelConfig& config, std::int64_t batch, std::int64_t seq_len,
                                    at::ScalarType dtype);

nlohmann::json plan_json(const RunPlan& plan);
// "12.3 GiB"-style text.
std::string format_bytes(double bytes);
// "80GiB", "80GB", "80G", "512MiB", "1e9": bytes; throws UsageError on anything else.
std::int64_t parse_bytes(const std::string& text, const std::string& option);

}  // namespace csaq::cli
