// Stage 2: choose a format (bits, group) per unit (a clique of rows of one Linear) for the
// whole model so that the average total bits per weight meets the target, all ranks agreeing.
//
// Each rank builds the units of its own Linears. For every format the Linear may use, its
// rows are quantized with the quantizer that pack will use (GPTQ on the Linear's input
// Hessian, or round-to-nearest; followers on their leader's parameters), and the caller's
// cost model turns the resulting error ΔW into a predicted loss increase per row; a unit's
// cost is the sum over its rows, its size the exact bits it takes in the checkpoint
// (unit_bits). Solvers:
//   lagrangian  every unit picks argmin_f cost_u(f) + λ·bits_u(f); λ is bisected on the
//               all-reduced global bit count; the last gap is closed by the best marginal
//               upgrades first (ties by global unit order), never exceeding the budget.
//   threshold   two tiers by cost density (cost saved per weight between the cheapest and
//               the most precise format), the cut found by bisection (one group option only).
//   uniform     one format everywhere, the widest (bits, group) option pair that fits
//               (round-to-nearest and GPTQ baselines); no row maps are stored then.
// Inputs being equal, every world size gives the same plan: unit choices depend only on the
// unit and λ, and bit counts are summed as exact integers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "csaq/shard/comm.h"
#include "csaq/shard/config.h"
#include "csaq/shard/progress.h"
#include "csaq/solver/quantizer.h"

namespace csaq {
namespace storage {
class H5File;
}

enum class SolverKind { kLagrangian, kThreshold, kUniform };
SolverKind parse_solver_kind(const std::string& name);
const char* solver_kind_name(SolverKind kind);

struct SolverOptions {
  SolverKind kind = SolverKind::kLagrangian;
  std::vector<int> bit_options{2, 3, 4, 8};        // any subset of {1, 2, 3, 4, 8, 16}
  std::vector<std::int64_t> group_options{32, 128};  // -1: whole rows
  double target_bits = 4.0;
  bool target_is_total = true;  // false: the target constrains payload bits only
  QuantizerOptions quantizer;
};

// Parses "2,4,8,16"; throws on values outside {1,2,3,4,8,16}, duplicates or an empty list.
std::vector<int> parse_bit_options(const std::string& text);
// Parses "32,128" (-1: whole rows); throws on non-positive values other than -1, duplicates.
std::vector<std::int64_t> parse_group_options(const std::string& text);

// Predicted loss increase of each row [out] (float64) when the Linear's weights change by
// `delta` [out, in] (every row quantized in `formats[format]`).
using RowCost = std::function<at::Tensor(const at::Tensor& delta, std::size_t format)>;

// What the solver needs of one Linear on this rank.
struct LinearInput {
  std::int64_t layer = 0;
  int linear = 0;
  at::Tensor weight;      // [out, in]
  at::Tensor row_leader;  // [out] int64 (see find_cliques)
  // [in, in] float32 Σ x xᵀ of its input, made when the solver reaches this Linear (so that
  // one input's matrix is whole at a time); empty: none measured.
  std::function<at::Tensor()> hessian;
  RowCost cost;           // unused by the uniform solver
};

// The decision for one Linear.
struct LinearPlan {
  std::int64_t layer = 0;
  int linear = 0;
  std::vector<Format> formats;  // the Linear's format table
  at::Tensor row_format;        // [out] uint8: index into formats
  at::Tensor row_leader;        // [out] int64; a 16-bit row is its own leader
};

struct PlanSummary {  // global (identical on every rank)
  std::int64_t weights = 0;
  std::int64_t payload_bits = 0;
  std::int64_t total_bits = 0;  // exactly the bits of the Linears' checkpoint datasets
  std::int64_t budget_bits = 0;
  double lambda = 0.0;
  double predicted_cost = 0.0;  // Σ of the chosen units' costs
  std::vector<std::pair<int, std::int64_t>> histogram;          // bits -> weights
  std::vector<std::pair<Format, std::int64_t>> format_histogram;  // (bits, group option) -> weights
  std::vector<double> layer_total_bits;                         // per decoder layer, per weight
  std::int64_t units = 0;
  double total_per_weight() const { return weights ? double(total_bits) / double(weights) : 0.0; }
  double payload_per_weight() const { return weights ? double(payload_bits) / double(weights) : 0.0; }
};

struct Plan {
  std::vector<LinearPlan> linears;  // this rank's
  PlanSummary summary;
};

// Checks before any expensive work that the target can be met for `shapes` ([out, in] of
// every decoder Linear of the model): the cheapest way to store every Linear must fit, and,
// for the mixed-format solvers, the target must not exceed the most bits the widest format
// can take (uniform methods take the widest format that fits, so no target is too large for
// them). Throws naming the achievable bound.
void check_target_reachable(const std::vector<std::pair<std::int64_t, std::int64_t>>& shapes,
                            const SolverOptions& options);

// Collective: writes every Linear's formats/row_format/row_leader under
// "plan/<layer>/<linear>/" (each rank its own) and rank 0's `report_json` as "report.json",
// with the model's config.json.
void save_plan(storage::H5File& file, const Plan& plan, const ModelConfig& config, const std::string& report_json,
               Communicator& comm);
// This rank's Linears (layers [begin, end)) of a saved plan; the config must match.
Plan load_plan(const storage::H5File& file, const ModelConfig& config, std::int64_t begin, std::int64_t end);

// Collective: every rank calls it with its own Linears. `progress` hears of each Linear whose
// costs are computed (the bulk of the work).
Plan solve(const std::vector<LinearInput>& linears, std::int64_t num_layers, Communicator& comm,
           const SolverOptions& options, const ProgressCallback& progress = {});

// The quantized values of one Linear for every format of `formats` with all rows in it, as
// the solver computes costs: calls fn(format index, quantized). GPTQ when `hessian` is defined
// and the options say so. `factor` may carry a precomputed GPTQ factor of that Hessian.
void for_each_format(const at::Tensor& weight, const at::Tensor& row_leader, const at::Tensor& hessian,
                     const std::vector<Format>& formats, const QuantizerOptions& options,
                     const std::function<void(std::size_t, const Quantized&)>& fn);
void for_each_format(const at::Tensor& weight, const at::Tensor& row_leader, const at::Tensor& hessian,
                     const std::vector<Format>& formats, const QuantizerOptions& options,
                     const std::function<void(std::size_t, const Quantized&)>& fn, GptqFactorCache& cache);

// The quantization pack stores for one Linear's plan.
struct QuantizedLinear {
  RowSpec spec;
  Quantized q;
};
QuantizedLinear quantize_linear(const at::Tensor& weight, const LinearPlan& plan, const at::Tensor& hessian,
                                const QuantizerOptions& options);
QuantizedLinear quantize_linear(const at::Tensor& weight, const LinearPlan& plan, const at::Tensor& hessian,
                                const QuantizerOptions& options, GptqFactorCache& cache);

// A format table as stored (int32 [F, 2]: bits, group) and back; `where` names it in errors.
at::Tensor formats_tensor(const std::vector<Format>& formats);
std::vector<Format> formats_from_tensor(const at::Tensor& table, const std::string& where);

}  // namespace csaq
