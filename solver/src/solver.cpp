#include "csaq/solver/solver.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <tuple>

#include "csaq/shard/model.h"
#include "csaq/solver/quantizer.h"
#include "csaq/storage/error.h"
#include "csaq/storage/h5.h"

namespace csaq {

SolverKind parse_solver_kind(const std::string& name) {
  if (name == "lagrangian") return SolverKind::kLagrangian;
  if (name == "threshold") return SolverKind::kThreshold;
  if (name == "uniform") return SolverKind::kUniform;
  CSAQ_FAIL("unknown solver '", name, "' (choose lagrangian or threshold)");
}

const char* solver_kind_name(SolverKind kind) {
  switch (kind) {
    case SolverKind::kLagrangian: return "lagrangian";
    case SolverKind::kThreshold: return "threshold";
    case SolverKind::kUniform: return "uniform";
  }
  return "?";
}

std::vector<int> parse_bit_options(const std::string& text) {
  std::vector<int> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    int b = 0;
    try {
      std::size_t used = 0;
      b = std::stoi(item, &used);
      CSAQ_CHECK(used == item.size(), "");
    } catch (const std::exception&) {
      CSAQ_FAIL("--bit-options: '", item, "' is not a number (expected a list such as 2,4,8,16)");
    }
    CSAQ_CHECK(b == 1 || b == 2 || b == 3 || b == 4 || b == 8 || b == 16, "--bit-options: ", b,
               " is not one of 1, 2, 3, 4, 8, 16");
    CSAQ_CHECK(std::find(out.begin(), out.end(), b) == out.end(), "--bit-options: ", b, " given twice");
    out.push_back(b);
  }
  CSAQ_CHECK(!out.empty(), "--bit-options is empty");
  std::sort(out.begin(), out.end());
  return out;
}

namespace {

std::int64_t basis(const UnitBits& b, bool total) { return total ? b.total() : b.payload; }

// The units of one Linear and their cost and size at every option.
struct LinearUnits {
  const LinearInput* input = nullptr;
  at::Tensor leaders;  // [u] int64, ascending
  at::Tensor members;  // [u] int64 rows per unit
  at::Tensor cost;     // [u, options] float64
  at::Tensor bits;     // [u, options] int64 (the budget's basis)
  at::Tensor payload;  // [u, options] int64
  at::Tensor total;    // [u, options] int64
  at::Tensor density;  // [u] float64 salience per weight
  at::Tensor choice;   // [u] int64 option index
};

LinearUnits build_units(const LinearInput& in, const SolverOptions& opt) {
  LinearUnits u;
  u.input = &in;
  const at::Tensor w = in.weight.detach().to(at::kFloat);
  const std::int64_t rows = w.size(0), cols = w.size(1);
  const std::int64_t group = effective_group(cols, opt.group_size);
  u.leaders = std::get<0>(at::_unique(in.row_leader, /*sorted=*/true));
  const at::Tensor slot = at::searchsorted(u.leaders, in.row_leader);  // unit of each row
  const std::int64_t n = u.leaders.size(0), k = static_cast<std::int64_t>(opt.bit_options.size());
  u.members = at::zeros({n}, at::kLong).index_add_(0, slot, at::ones({rows}, at::kLong));
  u.cost = at::zeros({n, k}, at::kDouble);
  u.bits = at::zeros({n, k}, at::kLong);
  u.payload = at::zeros({n, k}, at::kLong);
  u.total = at::zeros({n, k}, at::kLong);
  const bool salient = in.salience.defined();
  // s_w / |w|, 0 where w is 0 (there the salience is 0 as well).
  const at::Tensor weight_of_error =
      salient ? at::where(w.abs() > 0, in.salience / w.abs().clamp_min(1e-30), at::zeros_like(w)) : at::Tensor();
  for (std::int64_t o = 0; o < k; ++o) {
    const int b = opt.bit_options[o];
    if (salient) {
      at::Tensor deq;
      if (b == 16) {
        deq = dequantize_rows(quantize_rows(w, {}, 16, group), {}, 16, group);
      } else {
        const GroupParams own = group_params(w, b, group);
        const GroupParams p = own.rows(in.row_leader);
        deq = dequantize_rows(quantize_rows(w, p, b, group), p, b, group);
      }
      const at::Tensor row_cost = ((deq - w).abs() * weight_of_error).sum(1, false, at::kDouble);
      u.cost.select(1, o).index_add_(0, slot, row_cost);
    }
    // unit_bits is affine in the number of rows (codes and row maps per row, scales per
    // leader): every unit's size is fixed + members * per_row, computed for all units at once.
    const UnitBits none = unit_bits(0, cols, b, group), one = unit_bits(1, cols, b, group);
    CSAQ_ASSERT(unit_bits(2, cols, b, group).total() == 2 * one.total() - none.total());
    const at::Tensor payload = u.members * (one.payload - none.payload) + none.payload;
    const at::Tensor total = u.members * (one.total() - none.total()) + none.total();
    u.payload.select(1, o).copy_(payload);
    u.total.select(1, o).copy_(total);
    u.bits.select(1, o).copy_(opt.target_is_total ? total : payload);
  }
  if (salient) {
    const at::Tensor row_sal = in.salience.sum(1, false, at::kDouble);
    u.density = at::zeros({n}, at::kDouble).index_add_(0, slot, row_sal) / (u.members.to(at::kDouble) * cols);
  }
  return u;
}

class Solver {
 public:
  Solver(std::vector<LinearUnits>& units, Communicator& comm, std::int64_t budget)
      : units_(units), comm_(comm), budget_(budget) {}

  std::int64_t global_bits() {
    at::Tensor sum = at::zeros({1}, at::kLong);
    for (const auto& u : units_) sum += u.bits.gather(1, u.choice.unsqueeze(1)).sum();
    comm_.all_reduce(sum, ReduceOp::kSum);
    return sum.item<std::int64_t>();
  }

  void choose_lagrangian(double lambda) {
    for (auto& u : units_) u.choice = at::argmin(u.cost + lambda * u.bits.to(at::kDouble), 1);
  }

  void choose_constant(std::int64_t option) {
    for (auto& u : units_) u.choice = at::full({u.leaders.size(0)}, option, at::kLong);
  }

  // Two tiers: density >= t at option `hi`, else `lo`.
  void choose_threshold(double t, std::int64_t lo, std::int64_t hi) {
    for (auto& u : units_) u.choice = at::where(u.density >= t, at::full_like(u.leaders, hi), at::full_like(u.leaders, lo));
  }

  double lagrangian() {
    choose_lagrangian(0.0);
    if (global_bits() <= budget_) return 0.0;
    double hi = 1.0;
    for (int i = 0; i < 2000; ++i, hi *= 2) {
      choose_lagrangian(hi);
      if (global_bits() <= budget_) break;
    }
    double lo = 0.0;
    for (int i = 0; i < 200; ++i) {
      const double mid = 0.5 * (lo + hi);
      if (mid <= lo || mid >= hi) break;
      choose_lagrangian(mid);
      (global_bits() <= budget_ ? hi : lo) = mid;
    }
    close_gap(lo, hi);
    return hi;
  }

  void threshold(std::int64_t options) {
    std::int64_t lo = -1;
    for (std::int64_t o = 0; o < options; ++o) {
      choose_constant(o);
      if (global_bits() <= budget_) lo = o;
    }
    CSAQ_ASSERT(lo >= 0);
    choose_constant(lo);
    if (lo + 1 >= options) return;
    at::Tensor range = at::tensor({1e300, -1e300}, at::kDouble);
    for (const auto& u : units_) {
      if (u.density.numel() == 0) continue;
      range[0] = std::min(range[0].item<double>(), u.density.min().item<double>());
      range[1] = std::max(range[1].item<double>(), u.density.max().item<double>());
    }
    at::Tensor neg = at::stack({range[0], -range[1]});
    comm_.all_reduce(neg, ReduceOp::kMin);
    double t_lo = neg[0].item<double>(), t_hi = -neg[1].item<double>() * 2 + 1;  // t_hi: nobody upgraded
    for (int i = 0; i < 200; ++i) {
      const double mid = 0.5 * (t_lo + t_hi);
      if (mid <= t_lo || mid >= t_hi) break;
      choose_threshold(mid, lo, lo + 1);
      (global_bits() <= budget_ ? t_hi : t_lo) = mid;
    }
    choose_threshold(t_hi, lo, lo + 1);
  }

  std::int64_t uniform(std::int64_t options) {
    std::int64_t best = 0;
    for (std::int64_t o = 0; o < options; ++o) {
      choose_constant(o);
      if (global_bits() <= budget_) best = o;
    }
    choose_constant(best);
    return best;
  }

 private:
  // Units whose choice differs between lo (over budget) and hi (within it) are upgraded to
  // their lo choice, best cost saved per bit first, ties by global unit order, while the
  // budget allows. Every rank sees the same global list, so all agree.
  void close_gap(double lo, double hi) {
    choose_lagrangian(lo);
    std::vector<at::Tensor> lo_choice;
    for (const auto& u : units_) lo_choice.push_back(u.choice);
    choose_lagrangian(hi);
    std::int64_t remaining = budget_ - global_bits();
    std::vector<std::array<double, 4>> local;  // gain per bit, global id, extra bits, unit index
    for (std::size_t k = 0; k < units_.size(); ++k) {
      const LinearUnits& u = units_[k];
      const at::Tensor diff = (lo_choice[k] != u.choice).nonzero().reshape({-1});
      const double id_base = double((u.input->layer * kNumLinears + u.input->linear)) * 4294967296.0;
      for (std::int64_t i = 0; i < diff.size(0); ++i) {
        const std::int64_t unit = diff[i].item<std::int64_t>();
        const std::int64_t a = u.choice[unit].item<std::int64_t>(), b = lo_choice[k][unit].item<std::int64_t>();
        const double extra = double(u.bits[unit][b].item<std::int64_t>() - u.bits[unit][a].item<std::int64_t>());
        const double gain = u.cost[unit][a].item<double>() - u.cost[unit][b].item<double>();
        local.push_back({gain / extra, id_base + double(u.leaders[unit].item<std::int64_t>()), extra,
                         double(k) * 4294967296.0 + double(unit)});
      }
    }
    at::Tensor count = comm_.all_gather(at::tensor({static_cast<std::int64_t>(local.size())}, at::kLong));
    const std::int64_t most = count.max().item<std::int64_t>();
    if (most == 0) return;
    at::Tensor mine = at::zeros({most, 5}, at::kDouble);
    for (std::size_t i = 0; i < local.size(); ++i)
      for (int j = 0; j < 4; ++j) mine[static_cast<std::int64_t>(i)][j] = local[i][j];
    mine.slice(0, 0, static_cast<std::int64_t>(local.size())).select(1, 4).fill_(comm_.rank());
    at::Tensor all = comm_.all_gather(mine);  // [ranks, most, 5]
    std::vector<std::array<double, 5>> flips;
    for (std::int64_t r = 0; r < all.size(0); ++r)
      for (std::int64_t i = 0; i < count[r][0].item<std::int64_t>(); ++i) {
        std::array<double, 5> f{};
        for (int j = 0; j < 5; ++j) f[j] = all[r][i][j].item<double>();
        flips.push_back(f);
      }
    std::sort(flips.begin(), flips.end(), [](const auto& a, const auto& b) {
      return std::make_tuple(-a[0], a[1]) < std::make_tuple(-b[0], b[1]);
    });
    for (const auto& f : flips) {
      const auto extra = static_cast<std::int64_t>(f[2]);
      if (extra > remaining) continue;
      remaining -= extra;
      if (static_cast<int>(f[4]) != comm_.rank()) continue;
      const auto k = static_cast<std::size_t>(f[3] / 4294967296.0);
      const auto unit = static_cast<std::int64_t>(f[3] - double(k) * 4294967296.0);
      units_[k].choice[unit] = lo_choice[k][unit];
    }
  }

  std::vector<LinearUnits>& units_;
  Communicator& comm_;
  std::int64_t budget_;
};

}  // namespace

void check_target_reachable(const std::vector<std::pair<std::int64_t, std::int64_t>>& shapes,
                            const SolverOptions& opt) {
  CSAQ_CHECK(!opt.bit_options.empty(), "no bit options");
  double weights = 0, low = 0, high = 0;
  for (const auto& [out, in] : shapes) {
    const std::int64_t group = effective_group(in, opt.group_size);
    weights += double(out) * double(in);
    low += double(basis(unit_bits(1, in, opt.bit_options.front(), group), opt.target_is_total)) * double(out);
    // Most bits: one clique per Linear would carry the least metadata; every row at the top.
    high += double(basis(unit_bits(out, in, opt.bit_options.back(), group), opt.target_is_total));
  }
  const char* what = opt.target_is_total ? "total" : "payload";
  CSAQ_CHECK(opt.target_bits * weights >= low, "--target-bits ", opt.target_bits, " is unreachable: with bit options ",
             shape_str(opt.bit_options), " and --group-size ", opt.group_size, " the ", what,
             " bits per weight cannot go below ", low / weights);
  CSAQ_CHECK(opt.target_bits * weights <= high * (1 + 1e-12), "--target-bits ", opt.target_bits,
             " is unreachable: with bit options ", shape_str(opt.bit_options), " the ", what,
             " bits per weight cannot exceed ", high / weights);
}

Plan solve(const std::vector<LinearInput>& linears, std::int64_t num_layers, Communicator& comm,
           const SolverOptions& opt, const ProgressCallback& progress) {
  std::vector<LinearUnits> units;
  for (const auto& in : linears) {
    units.push_back(build_units(in, opt));
    if (progress) progress(static_cast<std::int64_t>(units.size()), static_cast<std::int64_t>(linears.size()));
  }
  at::Tensor weights = at::zeros({1}, at::kLong);
  for (const auto& in : linears) weights += in.weight.numel();
  comm.all_reduce(weights, ReduceOp::kSum);
  Plan plan;
  PlanSummary& s = plan.summary;
  s.weights = weights.item<std::int64_t>();
  s.budget_bits = static_cast<std::int64_t>(std::floor(opt.target_bits * double(s.weights)));

  Solver solver(units, comm, s.budget_bits);
  const auto options = static_cast<std::int64_t>(opt.bit_options.size());
  solver.choose_constant(0);
  const std::int64_t least = solver.global_bits();
  CSAQ_CHECK(least <= s.budget_bits, "--target-bits ", opt.target_bits, " is unreachable: every unit at ",
             opt.bit_options.front(), " bits already takes ", double(least) / double(s.weights),
             " bits per weight");
  switch (opt.kind) {
    case SolverKind::kLagrangian: s.lambda = solver.lagrangian(); break;
    case SolverKind::kThreshold: solver.threshold(options); break;
    case SolverKind::kUniform: solver.uniform(options); break;
  }

  // Per-row decisions and global totals.
  at::Tensor totals = at::zeros({2 + options + 2 * num_layers + 1}, at::kLong);  // payload, total, hist, layers, units
  for (const auto& u : units) {
    const LinearInput& in = *u.input;
    const at::Tensor chosen_bits = at::tensor(std::vector<std::int64_t>(opt.bit_options.begin(), opt.bit_options.end()),
                                              at::kLong).index_select(0, u.choice);
    const at::Tensor slot = at::searchsorted(u.leaders, in.row_leader);
    plan.linears.push_back({in.layer, in.linear, chosen_bits.index_select(0, slot).to(at::kByte), in.row_leader});
    const at::Tensor pay = u.payload.gather(1, u.choice.unsqueeze(1)).sum(), tot = u.total.gather(1, u.choice.unsqueeze(1)).sum();
    totals[0] += pay.item<std::int64_t>();
    totals[1] += tot.item<std::int64_t>();
    totals.slice(0, 2, 2 + options).index_add_(0, u.choice, u.members * in.weight.size(1));
    totals[2 + options + 2 * in.layer] += tot.item<std::int64_t>();
    totals[2 + options + 2 * in.layer + 1] += in.weight.numel();
    totals[2 + options + 2 * num_layers] += u.leaders.size(0);
  }
  comm.all_reduce(totals, ReduceOp::kSum);
  s.payload_bits = totals[0].item<std::int64_t>();
  s.total_bits = totals[1].item<std::int64_t>();
  for (std::int64_t o = 0; o < options; ++o) s.histogram.emplace_back(opt.bit_options[o], totals[2 + o].item<std::int64_t>());
  for (std::int64_t l = 0; l < num_layers; ++l) {
    const std::int64_t b = totals[2 + options + 2 * l].item<std::int64_t>(), n = totals[2 + options + 2 * l + 1].item<std::int64_t>();
    s.layer_total_bits.push_back(n ? double(b) / double(n) : 0.0);
  }
  s.units = totals[2 + options + 2 * num_layers].item<std::int64_t>();
  return plan;
}

}  // namespace csaq

namespace csaq {
namespace {
std::string plan_group(std::int64_t layer, int linear) {
  return "plan/" + std::to_string(layer) + "/" + kLinearNames.at(linear) + "/";
}
}  // namespace

void save_plan(storage::H5File& f, const Plan& plan, const ModelConfig& config, const std::string& report_json,
               Communicator& comm) {
  const bool rank0 = comm.rank() == 0;
  f.put_text("report.json", broadcast_string(comm, report_json), rank0);
  f.put_text("config.json", config.json_text, rank0);
  const auto shapes = linear_shapes(config);
  for (std::int64_t l = 0; l < config.num_layers; ++l)
    for (int i = 0; i < kNumLinears; ++i) {
      f.create_dataset(plan_group(l, i) + "row_bits", at::kByte, {shapes[i].first});
      f.create_dataset(plan_group(l, i) + "row_leader", at::kLong, {shapes[i].first});
    }
  for (const auto& lp : plan.linears) {
    f.write(plan_group(lp.layer, lp.linear) + "row_bits", lp.row_bits);
    f.write(plan_group(lp.layer, lp.linear) + "row_leader", lp.row_leader);
  }
}

Plan load_plan(const storage::H5File& f, const ModelConfig& config, std::int64_t begin, std::int64_t end) {
  CSAQ_CHECK(f.exists("plan") && f.exists("report.json"), "'", f.path(), "' is not a csaq plan file");
  CSAQ_CHECK(f.read_text("config.json") == config.json_text, "plan file '", f.path(),
             "' was made for a different model (its config.json differs)");
  Plan plan;
  for (std::int64_t l = begin; l < end; ++l)
    for (int i = 0; i < kNumLinears; ++i)
      plan.linears.push_back({l, i, f.read(plan_group(l, i) + "row_bits"), f.read(plan_group(l, i) + "row_leader")});
  return plan;
}

}  // namespace csaq
