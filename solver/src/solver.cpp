#include "csaq/solver/solver.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <sstream>
#include <tuple>

#include "csaq/shard/model.h"
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

namespace {
// Comma-separated integers of an option, each checked by `ok`.
std::vector<std::int64_t> parse_list(const std::string& text, const char* option, const char* example) {
  std::vector<std::int64_t> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    std::int64_t v = 0;
    try {
      std::size_t used = 0;
      v = std::stoll(item, &used);
      CSAQ_CHECK(used == item.size(), "");
    } catch (const std::exception&) {
      CSAQ_FAIL(option, ": '", item, "' is not a number (expected a list such as ", example, ")");
    }
    CSAQ_CHECK(std::find(out.begin(), out.end(), v) == out.end(), option, ": ", v, " given twice");
    out.push_back(v);
  }
  CSAQ_CHECK(!out.empty(), option, " is empty");
  std::sort(out.begin(), out.end());
  return out;
}
}  // namespace

std::vector<int> parse_bit_options(const std::string& text) {
  std::vector<int> out;
  for (std::int64_t b : parse_list(text, "--bit-options", "2,3,4,8")) {
    CSAQ_CHECK(b == 1 || b == 2 || b == 3 || b == 4 || b == 8 || b == 16, "--bit-options: ", b,
               " is not one of 1, 2, 3, 4, 8, 16");
    out.push_back(static_cast<int>(b));
  }
  return out;
}

std::vector<std::int64_t> parse_group_options(const std::string& text) {
  std::vector<std::int64_t> out = parse_list(text, "--group-options", "32,128");
  for (std::int64_t g : out) CSAQ_CHECK(g == -1 || g >= 1, "--group-options: ", g, " is neither -1 (whole rows) nor positive");
  return out;
}

namespace {
// The rows `spec` describes, quantized as pack stores them: GPTQ on the Hessian (rounding to
// nearest without one, or with --quantizer rtn), then, with refine_sweeps, refinement.
Quantized quantize_rows(const at::Tensor& weight, const RowSpec& spec, const at::Tensor& hessian,
                        const QuantizerOptions& opt, GptqFactorCache& cache) {
  const bool compensate = hessian.defined() && (spec.bits <= kMaxCodeBits).any().item<bool>();
  Quantized q = opt.gptq && compensate ? quantize_gptq(weight, spec, cache.get(hessian, opt), opt.block)
                                       : quantize_nearest(weight, spec);
  if (opt.refine_sweeps > 0 && compensate) q = refine_codes(weight, spec, hessian, q, opt.refine_sweeps);
  return q;
}
}  // namespace

void for_each_format(const at::Tensor& weight, const at::Tensor& row_leader, const at::Tensor& hessian,
                     const std::vector<Format>& formats, const QuantizerOptions& opt,
                     const std::function<void(std::size_t, const Quantized&)>& fn, GptqFactorCache& cache) {
  const std::int64_t out = weight.size(0);
  const at::Tensor column_weight = hessian.defined() ? hessian.diagonal() : at::Tensor();
  for (std::size_t f = 0; f < formats.size(); ++f) {
    const Format& fm = formats[f];
    const at::Tensor bits = at::full({out}, fm.bits, at::kLong), group = at::full({out}, fm.group, at::kLong);
    const RowSpec spec = make_row_spec(weight, bits, group, row_leader, column_weight, opt);
    fn(f, quantize_rows(weight, spec, hessian, opt, cache));
  }
}

void for_each_format(const at::Tensor& weight, const at::Tensor& row_leader, const at::Tensor& hessian,
                     const std::vector<Format>& formats, const QuantizerOptions& opt,
                     const std::function<void(std::size_t, const Quantized&)>& fn) {
  GptqFactorCache cache;
  for_each_format(weight, row_leader, hessian, formats, opt, fn, cache);
}

namespace {

at::Tensor format_bits(const std::vector<Format>& formats) {
  std::vector<std::int64_t> b;
  for (const auto& f : formats) b.push_back(f.bits);
  return at::tensor(b, at::kLong);
}

at::Tensor format_groups(const std::vector<Format>& formats) {
  std::vector<std::int64_t> g;
  for (const auto& f : formats) g.push_back(f.group);
  return at::tensor(g, at::kLong);
}

// The units of one Linear and their cost and size in every format.
struct LinearUnits {
  const LinearInput* input = nullptr;
  std::vector<Format> formats;
  at::Tensor leaders;  // [u] int64, ascending
  at::Tensor slot;     // [out] unit of each row
  at::Tensor members;  // [u] int64 rows per unit
  at::Tensor cost;     // [u, formats] float64
  at::Tensor bits;     // [u, formats] int64 (the budget's basis)
  at::Tensor density;  // [u] float64: cost saved per weight from the cheapest to the most precise format
  at::Tensor choice;   // [u] int64 format index
};

LinearUnits build_units(const LinearInput& in, const std::vector<Format>& formats, const SolverOptions& opt,
                        bool costs, GptqFactorCache& cache) {
  LinearUnits u;
  u.input = &in;
  u.formats = formats;
  const std::int64_t rows = in.weight.size(0), cols = in.weight.size(1);
  u.leaders = std::get<0>(at::_unique(in.row_leader, /*sorted=*/true));
  u.slot = at::searchsorted(u.leaders, in.row_leader);
  const std::int64_t n = u.leaders.size(0), k = static_cast<std::int64_t>(formats.size());
  u.members = at::zeros({n}, at::kLong).index_add_(0, u.slot, at::ones({rows}, at::kLong));
  u.cost = at::zeros({n, k}, at::kDouble);
  u.bits = at::zeros({n, k}, at::kLong);
  if (costs) {
    const at::Tensor w = in.weight.detach().to(at::kFloat);
    for_each_format(w, in.row_leader, in.hessian ? in.hessian() : at::Tensor(), formats, opt.quantizer,
                    [&](std::size_t f, const Quantized& q) {
                      const at::Tensor row_cost = in.cost(q.values - w, f).to(at::kDouble);
                      u.cost.select(1, static_cast<std::int64_t>(f)).index_add_(0, u.slot, row_cost);
                    },
                    cache);
    u.density = (u.cost.select(1, 0) - u.cost.select(1, k - 1)) / (u.members.to(at::kDouble) * cols);
  }
  for (std::int64_t f = 0; f < k; ++f) {
    // unit_bits is affine in the number of rows: fixed + members * per_row for all units at once.
    const UnitBits one = unit_bits(1, rows, cols, formats.size(), formats[f]);
    const UnitBits two = unit_bits(2, rows, cols, formats.size(), formats[f]);
    const std::int64_t per_row = opt.target_is_total ? two.total() - one.total() : two.payload - one.payload;
    const std::int64_t base = opt.target_is_total ? 2 * one.total() - two.total() : 2 * one.payload - two.payload;
    u.bits.select(1, f).copy_(u.members * per_row + base);
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

  void choose_smallest() {
    for (auto& u : units_) u.choice = at::argmin(u.bits, 1);
  }

  // Two tiers: density >= t at option `hi`, else `lo`.
  void choose_threshold(double t, std::int64_t lo, std::int64_t hi) {
    for (auto& u : units_) u.choice = at::where(u.density >= t, at::full_like(u.leaders, hi), at::full_like(u.leaders, lo));
  }

  // λ > 0 prices bits; when even λ = 0 (every unit at its least cost) fits, the cost model
  // says more bits would not help, and the budget is spent anyway at λ < 0: the plan that
  // adds the most bits for the least predicted cost, up to the target.
  double lagrangian() {
    choose_lagrangian(0.0);
    if (global_bits() <= budget_) {
      for (auto& u : units_) u.choice = at::argmax(u.bits, 1);
      if (global_bits() <= budget_) return 0.0;  // everything at its most bits fits
      double lo = -1.0, hi = 0.0;
      for (int i = 0; i < 2000; ++i, lo *= 2) {
        choose_lagrangian(lo);
        if (global_bits() > budget_) break;
        hi = lo;
      }
      return bisect(lo, hi);
    }
    double hi = 1.0;
    for (int i = 0; i < 2000; ++i, hi *= 2) {
      choose_lagrangian(hi);
      if (global_bits() <= budget_) break;
    }
    return bisect(0.0, hi);
  }

  // lo over the budget, hi within it: bisects, then closes the gap.
  double bisect(double lo, double hi) {
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

// Bits every Linear stores besides its units, with room for the padding of its bit streams.
std::int64_t reserved_bits(std::size_t num_formats) { return linear_fixed_bits(num_formats) + kPaddingReserveBits; }

// The widest uniform format (bits, group option) whose exact total fits the budget: every
// Linear one format, no row maps, no cliques.
std::pair<int, std::int64_t> widest_uniform(const std::vector<LinearInput>& linears, const SolverOptions& opt,
                                            std::int64_t budget, Communicator& comm) {
  std::vector<std::pair<int, std::int64_t>> pairs;
  for (int b : opt.bit_options)
    for (std::int64_t g : opt.group_options) pairs.emplace_back(b, b == 16 ? 0 : g);
  at::Tensor totals = at::zeros({static_cast<std::int64_t>(pairs.size())}, at::kLong);
  for (const auto& in : linears) {
    const std::int64_t out = in.weight.size(0), cols = in.weight.size(1);
    for (std::size_t p = 0; p < pairs.size(); ++p) {
      const Format f{pairs[p].first, pairs[p].first == 16 ? 0 : effective_group(cols, pairs[p].second)};
      const UnitBits b = linear_bits(out, cols, {f}, at::zeros({out}, at::kLong), at::arange(out, at::kLong));
      totals[static_cast<std::int64_t>(p)] += opt.target_is_total ? b.total() : b.payload;
    }
  }
  comm.all_reduce(totals, ReduceOp::kSum);
  std::int64_t best = -1;
  for (std::size_t p = 0; p < pairs.size(); ++p) {
    const std::int64_t t = totals[static_cast<std::int64_t>(p)].item<std::int64_t>();
    if (t <= budget && (best < 0 || t > totals[best].item<std::int64_t>())) best = static_cast<std::int64_t>(p);
  }
  CSAQ_CHECK(best >= 0, "--target-bits ", opt.target_bits, " is unreachable by a uniform format: the smallest takes ",
             double(totals.min().item<std::int64_t>()), " bits in all");
  return pairs[static_cast<std::size_t>(best)];
}

}  // namespace

void check_target_reachable(const std::vector<std::pair<std::int64_t, std::int64_t>>& shapes,
                            const SolverOptions& opt) {
  CSAQ_CHECK(!opt.bit_options.empty() && !opt.group_options.empty(), "no bit or group options");
  double weights = 0, low = 0, high = 0;
  for (const auto& [out, in] : shapes) {
    const std::vector<Format> formats = linear_formats(in, opt.bit_options, opt.group_options);
    weights += double(out) * double(in);
    const bool uniform = opt.kind == SolverKind::kUniform;
    const std::size_t f = uniform ? 1 : formats.size();
    double least = 1e300, most = 0;
    for (const Format& fm : formats) {
      // Every row its own unit, or (mixed formats only) one clique of all rows sharing its
      // leader's parameters: the fewest bits a format takes is the smaller of the two, the
      // most the larger. Uniform formats have no cliques.
      const UnitBits one = unit_bits(1, out, in, f, fm), all = unit_bits(out, out, in, f, fm);
      const double rows = double(opt.target_is_total ? one.total() : one.payload) * double(out);
      const double clique = double(opt.target_is_total ? all.total() : all.payload);
      least = std::min(least, uniform ? rows : std::min(rows, clique));
      most = std::max(most, uniform ? rows : std::max(rows, clique));
    }
    const double fixed = opt.target_is_total ? double(linear_fixed_bits(f)) : 0.0;
    low += least + fixed;
    high += most + fixed;
  }
  const char* what = opt.target_is_total ? "total" : "payload";
  CSAQ_CHECK(opt.target_bits * weights >= low, "--target-bits ", opt.target_bits, " is unreachable: with bit options ",
             shape_str(opt.bit_options), " and group options ", shape_str(opt.group_options), " the ", what,
             " bits per weight cannot go below ", low / weights);
  // A uniform method takes the widest format that fits, so any budget above its smallest does.
  CSAQ_CHECK(opt.kind == SolverKind::kUniform || opt.target_bits * weights <= high * (1 + 1e-12), "--target-bits ",
             opt.target_bits, " is unreachable: with bit options ", shape_str(opt.bit_options), " the ", what,
             " bits per weight cannot exceed ", high / weights);
}

Plan solve(const std::vector<LinearInput>& linears, std::int64_t num_layers, Communicator& comm,
           const SolverOptions& opt, const ProgressCallback& progress) {
  at::Tensor weights = at::zeros({1}, at::kLong);
  for (const auto& in : linears) weights += in.weight.numel();
  comm.all_reduce(weights, ReduceOp::kSum);
  Plan plan;
  PlanSummary& s = plan.summary;
  s.weights = weights.item<std::int64_t>();
  s.budget_bits = static_cast<std::int64_t>(std::floor(opt.target_bits * double(s.weights)));
  CSAQ_CHECK(opt.kind != SolverKind::kThreshold || opt.group_options.size() == 1,
             "--solver threshold takes one group option, not ", shape_str(opt.group_options));

  std::vector<LinearUnits> units;
  std::int64_t budget = s.budget_bits;
  const bool uniform = opt.kind == SolverKind::kUniform;
  std::pair<int, std::int64_t> uniform_choice{};
  if (uniform) uniform_choice = widest_uniform(linears, opt, s.budget_bits, comm);
  GptqFactorCache cache;
  for (const auto& in : linears) {
    const std::int64_t cols = in.weight.size(1);
    std::vector<Format> formats = linear_formats(cols, opt.bit_options, opt.group_options);
    if (uniform)
      formats = {Format{uniform_choice.first, uniform_choice.first == 16 ? 0 : effective_group(cols, uniform_choice.second)}};
    units.push_back(build_units(in, formats, opt, !uniform, cache));
    if (opt.target_is_total) budget -= reserved_bits(formats.size());
    if (progress) progress(static_cast<std::int64_t>(units.size()), static_cast<std::int64_t>(linears.size()));
  }
  at::Tensor reserve = at::tensor({s.budget_bits - budget}, at::kLong);
  comm.all_reduce(reserve, ReduceOp::kSum);
  budget = s.budget_bits - reserve.item<std::int64_t>();

  Solver solver(units, comm, budget);
  solver.choose_smallest();
  const std::int64_t least = solver.global_bits();
  CSAQ_CHECK(uniform || least <= budget, "--target-bits ", opt.target_bits, " is unreachable: every unit in its smallest format already takes ",
             double(least + reserve.item<std::int64_t>()) / double(s.weights), " bits per weight");
  switch (opt.kind) {
    case SolverKind::kLagrangian: s.lambda = solver.lagrangian(); break;
    case SolverKind::kThreshold: solver.threshold(static_cast<std::int64_t>(units.empty() ? 1 : units[0].formats.size())); break;
    case SolverKind::kUniform: solver.choose_constant(0); break;
  }

  // Per-row decisions and global totals.
  const auto options = static_cast<std::int64_t>(opt.bit_options.size());
  std::vector<std::pair<int, std::int64_t>> pairs;  // (bits, group option) of the format histogram
  for (int b : opt.bit_options)
    if (b == 16) pairs.emplace_back(16, 0);
    else
      for (std::int64_t g : opt.group_options) pairs.emplace_back(b, g);
  const auto npairs = static_cast<std::int64_t>(pairs.size());
  // payload, total, bits histogram, format histogram, per layer (total, weights), units
  at::Tensor totals = at::zeros({2 + options + npairs + 2 * num_layers + 1}, at::kLong);
  // Predicted cost per layer (each layer on one rank), summed in layer order after the
  // reduction, so that the total does not depend on how layers are spread over ranks.
  at::Tensor layer_cost = at::zeros({num_layers}, at::kDouble);
  for (auto& u : units) {
    const LinearInput& in = *u.input;
    const std::int64_t out = in.weight.size(0), cols = in.weight.size(1);
    const at::Tensor row_format = u.choice.index_select(0, u.slot);
    // 16-bit rows need no leader: each is its own.
    const at::Tensor full = format_bits(u.formats).index_select(0, row_format) == 16;
    const at::Tensor leader =
        uniform ? at::arange(out, at::kLong) : at::where(full, at::arange(out, at::kLong), in.row_leader);
    plan.linears.push_back({in.layer, in.linear, u.formats, row_format.to(at::kByte), leader});
    const UnitBits b = linear_bits(out, cols, u.formats, row_format, leader);
    totals[0] += b.payload;
    totals[1] += b.total();
    const at::Tensor row_bits = format_bits(u.formats).index_select(0, row_format);
    const at::Tensor row_group = format_groups(u.formats).index_select(0, row_format);
    for (std::int64_t o = 0; o < options; ++o) totals[2 + o] += (row_bits == opt.bit_options[o]).sum() * cols;
    for (std::int64_t p = 0; p < npairs; ++p) {
      const auto [pb, pg] = pairs[p];
      const std::int64_t g = pb == 16 ? 0 : effective_group(cols, pg);
      // A group option that coincides with another on this Linear counts under the first.
      std::int64_t first = p;
      for (std::int64_t q = 0; q < p; ++q)
        if (pairs[q].first == pb && (pb == 16 || effective_group(cols, pairs[q].second) == g)) first = std::min(first, q);
      if (first == p) totals[2 + options + p] += at::logical_and(row_bits == pb, row_group == g).sum() * cols;
    }
    totals[2 + options + npairs + 2 * in.layer] += b.total();
    totals[2 + options + npairs + 2 * in.layer + 1] += in.weight.numel();
    totals[2 + options + npairs + 2 * num_layers] += u.leaders.size(0);
    if (u.cost.defined()) layer_cost[in.layer] += u.cost.gather(1, u.choice.unsqueeze(1)).sum().item<double>();
  }
  comm.all_reduce(totals, ReduceOp::kSum);
  comm.all_reduce(layer_cost, ReduceOp::kSum);
  s.predicted_cost = 0;
  for (std::int64_t l = 0; l < num_layers; ++l) s.predicted_cost += layer_cost[l].item<double>();
  s.payload_bits = totals[0].item<std::int64_t>();
  s.total_bits = totals[1].item<std::int64_t>();
  CSAQ_ASSERT(!opt.target_is_total || s.total_bits <= s.budget_bits, "plan exceeds its budget");
  for (std::int64_t o = 0; o < options; ++o) s.histogram.emplace_back(opt.bit_options[o], totals[2 + o].item<std::int64_t>());
  for (std::int64_t p = 0; p < npairs; ++p)
    s.format_histogram.emplace_back(Format{pairs[p].first, pairs[p].second}, totals[2 + options + p].item<std::int64_t>());
  for (std::int64_t l = 0; l < num_layers; ++l) {
    const std::int64_t b = totals[2 + options + npairs + 2 * l].item<std::int64_t>();
    const std::int64_t n = totals[2 + options + npairs + 2 * l + 1].item<std::int64_t>();
    s.layer_total_bits.push_back(n ? double(b) / double(n) : 0.0);
  }
  s.units = totals[2 + options + npairs + 2 * num_layers].item<std::int64_t>();
  return plan;
}

QuantizedLinear quantize_linear(const at::Tensor& weight, const LinearPlan& plan, const at::Tensor& hessian,
                                const QuantizerOptions& opt, GptqFactorCache& cache) {
  const at::Tensor fmt = plan.row_format.to(at::kLong);
  const at::Tensor bits = format_bits(plan.formats).index_select(0, fmt);
  const at::Tensor group = format_groups(plan.formats).index_select(0, fmt);
  QuantizedLinear out;
  out.spec = make_row_spec(weight, bits, group, plan.row_leader,
                           hessian.defined() ? hessian.diagonal() : at::Tensor(), opt);
  out.q = quantize_rows(weight, out.spec, hessian, opt, cache);
  return out;
}

QuantizedLinear quantize_linear(const at::Tensor& weight, const LinearPlan& plan, const at::Tensor& hessian,
                                const QuantizerOptions& opt) {
  GptqFactorCache cache;
  return quantize_linear(weight, plan, hessian, opt, cache);
}

}  // namespace csaq

namespace csaq {
namespace {
std::string plan_group(std::int64_t layer, int linear) {
  return "plan/" + std::to_string(layer) + "/" + kLinearNames.at(linear) + "/";
}
}  // namespace

at::Tensor formats_tensor(const std::vector<Format>& formats) {
  std::vector<std::int32_t> v;
  for (const auto& f : formats) {
    v.push_back(f.bits);
    v.push_back(static_cast<std::int32_t>(f.group));
  }
  return at::tensor(v, at::kInt).view({static_cast<std::int64_t>(formats.size()), 2});
}

std::vector<Format> formats_from_tensor(const at::Tensor& table, const std::string& where) {
  CSAQ_CHECK(table.dim() == 2 && table.size(1) == 2 && table.size(0) >= 1, where, " must be [formats, 2]");
  std::vector<Format> out;
  const at::Tensor t = table.to(at::kLong);
  for (std::int64_t i = 0; i < t.size(0); ++i) out.push_back({static_cast<int>(t[i][0].item<std::int64_t>()), t[i][1].item<std::int64_t>()});
  return out;
}

void save_plan(storage::H5File& f, const Plan& plan, const ModelConfig& config, const std::string& report_json,
               Communicator& comm) {
  const bool rank0 = comm.rank() == 0;
  f.put_text("report.json", broadcast_string(comm, report_json), rank0);
  f.put_text("config.json", config.json_text, rank0);
  const auto shapes = linear_shapes(config);
  // The format tables' sizes are per Linear: all-reduced so that creation is collective.
  at::Tensor sizes = at::zeros({config.num_layers * kNumLinears}, at::kLong);
  for (const auto& lp : plan.linears) sizes[lp.layer * kNumLinears + lp.linear] = static_cast<std::int64_t>(lp.formats.size());
  comm.all_reduce(sizes, ReduceOp::kSum);
  for (std::int64_t l = 0; l < config.num_layers; ++l)
    for (int i = 0; i < kNumLinears; ++i) {
      f.create_dataset(plan_group(l, i) + "formats", at::kInt, {sizes[l * kNumLinears + i].item<std::int64_t>(), 2});
      f.create_dataset(plan_group(l, i) + "row_format", at::kByte, {shapes[i].first});
      f.create_dataset(plan_group(l, i) + "row_leader", at::kLong, {shapes[i].first});
    }
  for (const auto& lp : plan.linears) {
    f.write(plan_group(lp.layer, lp.linear) + "formats", formats_tensor(lp.formats));
    f.write(plan_group(lp.layer, lp.linear) + "row_format", lp.row_format);
    f.write(plan_group(lp.layer, lp.linear) + "row_leader", lp.row_leader);
  }
}

Plan load_plan(const storage::H5File& f, const ModelConfig& config, std::int64_t begin, std::int64_t end) {
  CSAQ_CHECK(f.exists("plan") && f.exists("report.json"), "'", f.path(), "' is not a csaq plan file");
  CSAQ_CHECK(f.read_text("config.json") == config.json_text, "plan file '", f.path(),
             "' was made for a different model (its config.json differs)");
  CSAQ_CHECK(f.exists(plan_group(begin, 0) + "formats"), "plan file '", f.path(),
             "' was written by an older csaq (no format tables); solve again");
  Plan plan;
  for (std::int64_t l = begin; l < end; ++l)
    for (int i = 0; i < kNumLinears; ++i) {
      const std::string g = plan_group(l, i);
      plan.linears.push_back({l, i, formats_from_tensor(f.read(g + "formats"), f.path() + ":" + g + "formats"),
                              f.read(g + "row_format"), f.read(g + "row_leader")});
    }
  return plan;
}

}  // namespace csaq
