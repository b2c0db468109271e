#include "csaq/profiler/coactivation.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <cmath>
#include <functional>
#include <vector>

#include "csaq/storage/error.h"

namespace csaq {

CoActivation::CoActivation(std::int64_t channels, std::int64_t max_candidates, double fire_fraction)
    : channels_(channels), max_candidates_(std::min(channels, max_candidates)), fire_fraction_(fire_fraction) {
  CSAQ_CHECK(max_candidates >= 1, "co-activation candidates must be at least 1");
  CSAQ_CHECK(fire_fraction > 0 && fire_fraction <= 1, "fire fraction must be in (0, 1], got ", fire_fraction);
}

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define CSAQ_POPCOUNT_CLONES __attribute__((target_clones("popcnt", "default")))
#else
#define CSAQ_POPCOUNT_CLONES
#endif

// counts[i][j] += |bits_i AND bits_j| for the upper triangle j >= i (bits: [K, words]); the
// lower triangle is mirrored by the caller. Rows are independent, so threads split them.
CSAQ_POPCOUNT_CLONES
void add_intersections(const std::uint64_t* bits, std::int64_t k, std::int64_t words, std::int64_t* counts,
                       std::int64_t begin, std::int64_t end) {
  for (std::int64_t i = begin; i < end; ++i) {
    const std::uint64_t* bi = bits + i * words;
    for (std::int64_t j = i; j < k; ++j) {
      const std::uint64_t* bj = bits + j * words;
      std::int64_t n = 0;
      for (std::int64_t w = 0; w < words; ++w) n += __builtin_popcountll(bi[w] & bj[w]);
      counts[i * k + j] += n;
    }
  }
}

// Order-preserving keys of |y|: the bit pattern of a float with its sign cleared orders like
// its magnitude (+0 and -0 both 0).
void magnitude_keys(const float* v, std::int64_t n, std::uint32_t* keys) {
  std::memcpy(keys, v, static_cast<std::size_t>(n) * sizeof(float));
  for (std::int64_t i = 0; i < n; ++i) keys[i] &= 0x7FFFFFFFu;
}

// The k-th largest of `n` keys (1 <= k <= n), exactly: a histogram of the top 8 bits finds
// the bin holding it, a histogram of the next 8 bits within that bin the sub-bin, and a
// selection among the sub-bin's keys (usually a handful) finishes. Four interleaved
// histograms keep repeated bins from stalling on one counter.
std::uint32_t kth_largest(const std::uint32_t* keys, std::int64_t n, std::int64_t k, std::vector<std::uint32_t>& rest) {
  std::array<std::array<std::int32_t, 256>, 4> h{};
  std::int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int l = 0; l < 4; ++l) ++h[l][keys[i + l] >> 23];
  for (; i < n; ++i) ++h[0][keys[i] >> 23];
  auto pick = [&](std::int64_t& above) {  // the bin, from the top, that holds the k-th
    std::uint32_t bin = 255;
    for (;; --bin) {
      const std::int64_t c = h[0][bin] + h[1][bin] + h[2][bin] + h[3][bin];
      if (above + c >= k) return bin;
      above += c;
    }
  };
  std::int64_t above = 0;
  const std::uint32_t top = pick(above);
  h = {};
  for (i = 0; i < n; ++i)
    if ((keys[i] >> 23) == top) ++h[i & 3][(keys[i] >> 15) & 0xFFu];
  const std::uint32_t prefix = top << 8 | pick(above);
  rest.clear();
  for (i = 0; i < n; ++i)
    if ((keys[i] >> 15) == prefix) rest.push_back(keys[i]);
  const auto nth = rest.begin() + (k - above - 1);
  std::nth_element(rest.begin(), nth, rest.end(), std::greater<std::uint32_t>());
  return *nth;
}

}  // namespace

void CoActivation::observe(const at::Tensor& y) {
  CSAQ_ASSERT(y.size(-1) == channels_);
  const at::Tensor y32 = y.detach().reshape({-1, channels_}).to(at::kFloat).contiguous();
  if (!candidates_.defined()) {
    const at::Tensor a = y32.abs();
    // The K channels with the largest mean |y| on this first micro-batch; stable order.
    const at::Tensor mean = a.mean(0).neg();
    const at::Tensor order = std::get<1>(at::sort(mean, /*stable=*/true, 0, /*descending=*/false));
    candidates_ = std::get<0>(at::sort(order.slice(0, 0, max_candidates_)));
    counts_ = at::zeros({max_candidates_, max_candidates_}, at::kLong);
  }
  // Per token: the k-th largest |y| is the firing threshold.
  const std::int64_t k = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(fire_fraction_ * channels_)));
  const std::int64_t tokens = y32.size(0);
  tokens_ += tokens;
  if (!y32.device().is_cpu()) {
    // On an accelerator: the 0/1 firing matrix times itself (exact: per micro-batch counts
    // stay far below 2^24).
    const at::Tensor a = y32.abs();
    const at::Tensor threshold = std::get<0>(at::topk(a, k, -1)).select(-1, k - 1).unsqueeze(-1);
    const at::Tensor fires = (a.index_select(1, candidates_.to(a.device())) >= threshold).to(at::kFloat);
    counts_ += at::matmul(fires.t(), fires).round().to(at::kLong).cpu();
    return;
  }
  // On the CPU: each candidate's firing tokens as a bit vector (64 tokens a word), the
  // threshold by selection (not sorting) per token, and intersections by AND + popcount.
  const std::int64_t kc = max_candidates_, words = (tokens + 63) / 64;
  std::vector<std::uint64_t> bits(static_cast<std::size_t>(kc * words), 0);
  const float* values = y32.data_ptr<float>();
  const std::int64_t* cand = candidates_.data_ptr<std::int64_t>();
  at::parallel_for(0, words, 1, [&](std::int64_t w0, std::int64_t w1) {
    std::vector<std::uint32_t> keys(static_cast<std::size_t>(channels_)), rest;
    rest.reserve(static_cast<std::size_t>(channels_));
    for (std::int64_t w = w0; w < w1; ++w)
      for (std::int64_t t = w * 64; t < std::min(tokens, (w + 1) * 64); ++t) {
        magnitude_keys(values + t * channels_, channels_, keys.data());
        const std::uint32_t threshold = kth_largest(keys.data(), channels_, k, rest);
        const std::uint64_t bit = std::uint64_t{1} << (t - w * 64);
        for (std::int64_t j = 0; j < kc; ++j)
          if (keys[static_cast<std::size_t>(cand[j])] >= threshold) bits[static_cast<std::size_t>(j * words + w)] |= bit;
      }
  });
  std::int64_t* counts = counts_.data_ptr<std::int64_t>();
  at::parallel_for(0, kc, 8, [&](std::int64_t i0, std::int64_t i1) {
    add_intersections(bits.data(), kc, words, counts, i0, i1);
  });
  for (std::int64_t i = 0; i < kc; ++i)
    for (std::int64_t j = 0; j < i; ++j) counts[i * kc + j] = counts[j * kc + i];
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
