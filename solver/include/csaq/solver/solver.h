// Stage 2: choose bits per unit (a clique of rows of one Linear) for the whole model so that
// the average total bits per weight meets the target, all ranks agreeing.
//
// Each rank builds the units of its own Linears with a cost per bit option,
// cost_u(b) = Σ_{w∈u} s_w · |Q_b(w) − w| / |w| (quantized with the unit leader's scale), and
// a size bits_u(b) (unit_bits). Solvers:
//   lagrangian  every unit picks argmin_b cost_u(b) + λ·bits_u(b); λ is bisected on the
//               all-reduced global bit count; the last gap is closed by the best marginal
//               upgrades first (ties by global unit order), never exceeding the budget.
//   threshold   two tiers by salience density (Σ s / weights), the cut found by bisection.
//   uniform     every unit at the largest option that fits (round-to-nearest baseline).
// Inputs being equal, every world size gives the same plan: unit choices depend only on the
// unit and λ, and bit counts are summed as exact integers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "csaq/shard/comm.h"
#include "csaq/shard/config.h"
#include "csaq/shard/progress.h"

namespace csaq {
namespace storage {
class H5File;
}

enum class SolverKind { kLagrangian, kThreshold, kUniform };
SolverKind parse_solver_kind(const std::string& name);
const char* solver_kind_name(SolverKind kind);

struct SolverOptions {
  SolverKind kind = SolverKind::kLagrangian;
  std::vector<int> bit_options{2, 4, 8, 16};  // any subset of {1, 2, 3, 4, 8, 16}
  double target_bits = 4.0;
  bool target_is_total = true;  // false: the target constrains payload bits only
  std::int64_t group_size = 128;
};

// Parses "2,4,8,16"; throws on values outside {1,2,3,4,8,16}, duplicates or an empty list.
std::vector<int> parse_bit_options(const std::string& text);

// What the solver needs of one Linear on this rank.
struct LinearInput {
  std::int64_t layer = 0;
  int linear = 0;
  at::Tensor weight;      // [out, in]
  at::Tensor salience;    // [out, in] float32 (unused by the uniform solver)
  at::Tensor row_leader;  // [out] int64 (see find_cliques)
};

// The decision for one Linear.
struct LinearPlan {
  std::int64_t layer = 0;
  int linear = 0;
  at::Tensor row_bits;    // [out] uint8
  at::Tensor row_leader;  // [out] int64
};

struct PlanSummary {  // global (identical on every rank)
  std::int64_t weights = 0;
  std::int64_t payload_bits = 0;
  std::int64_t total_bits = 0;
  std::int64_t budget_bits = 0;
  double lambda = 0.0;
  std::vector<std::pair<int, std::int64_t>> histogram;  // bits -> weights
  std::vector<double> layer_total_bits;                 // per decoder layer, per weight
  std::int64_t units = 0;
  double total_per_weight() const { return weights ? double(total_bits) / double(weights) : 0.0; }
  double payload_per_weight() const { return weights ? double(payload_bits) / double(weights) : 0.0; }
};

struct Plan {
  std::vector<LinearPlan> linears;  // this rank's
  PlanSummary summary;
};

// Checks before any expensive work that the target can be met: with no cliques (every
// row its own leader, the most metadata) for `shapes` ([out, in] of every decoder Linear of
// the model), the smallest option must fit. Throws naming the achievable range.
void check_target_reachable(const std::vector<std::pair<std::int64_t, std::int64_t>>& shapes,
                            const SolverOptions& options);

// Collective: writes every Linear's row_bits/row_leader under "plan/<layer>/<linear>/" (each
// rank its own) and rank 0's `report_json` as "report.json", with the model's config.json.
void save_plan(storage::H5File& file, const Plan& plan, const ModelConfig& config, const std::string& report_json,
               Communicator& comm);
// This rank's Linears (layers [begin, end)) of a saved plan; the config must match.
Plan load_plan(const storage::H5File& file, const ModelConfig& config, std::int64_t begin, std::int64_t end);

// Collective: every rank calls it with its own Linears. `progress` hears of each Linear whose
// costs are computed (the bulk of the work).
Plan solve(const std::vector<LinearInput>& linears, std::int64_t num_layers, Communicator& comm,
           const SolverOptions& options, const ProgressCallback& progress = {});

}  // namespace csaq
