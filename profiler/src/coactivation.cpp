#include "csaq/profiler/coactivation.h"

#include <ATen/ATen.h>

#include <cmath>

#include "csaq/storage/error.h"

namespace csaq {

CoActivation::CoActivation(std::int64_t channels, std::int64_t max_candidates, double fire_fraction)
    : channels_(channels), max_candidates_(std::min(channels, max_candidates)), fire_fraction_(fire_fraction) {
  CSAQ_CHECK(max_candidates >= 1, "co-activation candidates must be at least 1");
  CSAQ_CHECK(fire_fraction > 0 && fire_fraction <= 1, "fire fraction must be in (0, 1], got ", fire_fraction);
}

void CoActivation::observe(const at::Tensor& y) {
  CSAQ_ASSERT(y.size(-1) == channels_);
  const at::Tensor a = y.detach().reshape({-1, channels_}).abs().to(at::kFloat);
  if (!candidates_.defined()) {
    // The K channels with the largest mean |y| on this first micro-batch; stable order.
    const at::Tensor mean = a.mean(0).neg();
    const at::Tensor order = std::get<1>(at::sort(mean, /*stable=*/true, 0, /*descending=*/false));
    candidates_ = std::get<0>(at::sort(order.slice(0, 0, max_candidates_)));
    counts_ = at::zeros({max_candidates_, max_candidates_}, at::kLong);
  }
  // Per token: the k-th largest |y| is the firing threshold.
  const std::int64_t k = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(fire_fraction_ * channels_)));
  const at::Tensor threshold = std::get<0>(at::topk(a, k, -1)).select(-1, k - 1).unsqueeze(-1);
  const at::Tensor fires = (a.index_select(1, candidates_) >= threshold).to(at::kFloat);  // [T, K]
  // Exact: per micro-batch counts stay far below 2^24.
  counts_ += at::matmul(fires.t(), fires).round().to(at::kLong);
  tokens_ += a.size(0);
}

at::Tensor CoActivation::jaccard() const {
  CSAQ_ASSERT(started());
  const at::Tensor c = counts_.to(at::kDouble);
  const at::Tensor d = c.diagonal();
  const at::Tensor uni = d.unsqueeze(0) + d.unsqueeze(1) - c;
  return at::where(uni > 0, c / uni.clamp_min(1), at::zeros_like(c));
}

std::size_t CoActivation::state_bytes() const {
  return (candidates_.defined() ? candidates_.nbytes() + counts_.nbytes() : 0) + sizeof(*this);
}

void CoActivation::restore(at::Tensor candidates, at::Tensor counts, std::int64_t tokens) {
  candidates_ = std::move(candidates);
  counts_ = std::move(counts);
  tokens_ = tokens;
}

at::Tensor find_cliques(const CoActivation& coact, const at::Tensor& row_salience, double threshold) {
  const std::int64_t n = coact.channels();
  at::Tensor leader = at::arange(n, at::kLong);
  if (!coact.started()) return leader;
  const at::Tensor cand = coact.candidates();
  const at::Tensor jac = coact.jaccard();
  const std::int64_t k = cand.size(0);
  const at::Tensor sal = row_salience.to(at::kDouble).index_select(0, cand).neg();
  const at::Tensor order = std::get<1>(at::sort(sal, /*stable=*/true, 0, false));
  auto* lead = leader.data_ptr<std::int64_t>();
  const auto* rows = cand.data_ptr<std::int64_t>();
  const auto* ord = order.data_ptr<std::int64_t>();
  const at::Tensor jc = jac.contiguous();
  const double* j = jc.data_ptr<double>();
  std::vector<char> assigned(static_cast<std::size_t>(k), 0);
  for (std::int64_t a = 0; a < k; ++a) {
    const std::int64_t p = ord[a];
    if (assigned[p]) continue;
    assigned[p] = 1;
    for (std::int64_t b = a + 1; b < k; ++b) {
      const std::int64_t q = ord[b];
      if (!assigned[q] && j[p * k + q] >= threshold) {
        assigned[q] = 1;
        lead[rows[q]] = rows[p];
      }
    }
  }
  return leader;
}

}  // namespace csaq
