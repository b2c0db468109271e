#include "csaq/solver/quantizer.h"

#include <ATen/ATen.h>

#include "csaq/storage/error.h"

namespace csaq {

std::int64_t effective_group(std::int64_t in, std::int64_t group_size) {
  CSAQ_CHECK(group_size == -1 || group_size >= 1, "--group-size must be -1 (whole row) or positive, got ", group_size);
  const std::int64_t g = group_size == -1 || group_size >= in ? in : group_size;
  CSAQ_CHECK(in % g == 0, "--group-size ", group_size, " does not divide a Linear's ", in, " input features");
  return g;
}

GroupParams group_params(const at::Tensor& rows, int bits, std::int64_t group) {
  CSAQ_ASSERT(bits >= 1 && bits <= kMaxCodeBits);
  const at::Tensor g = rows.to(at::kFloat).reshape({rows.size(0), -1, group});
  const at::Tensor lo = std::get<0>(g.min(2)).clamp_max(0), hi = std::get<0>(g.max(2)).clamp_min(0);
  const double qmax = static_cast<double>((1 << bits) - 1);
  // fp16 scale rounded up, never down: the group's own [lo, hi] stays representable, so no
  // value of the leader row is clipped and its error is at most half a step.
  const at::Tensor exact = (hi - lo) / qmax;
  at::Tensor half = exact.to(at::kHalf);
  const at::Tensor below = half.to(at::kFloat) < exact;
  half = at::where(below, (half.view(at::kShort) + 1).view(at::kHalf), half);
  at::Tensor scale = half.to(at::kFloat);
  CSAQ_CHECK(at::isfinite(scale).all().item<bool>(), "a weight group's range overflows fp16 scales");
  scale = at::where(scale > 0, scale, at::ones_like(scale));
  const at::Tensor zero = at::round(-lo / scale).clamp(0, qmax).to(at::kByte);
  return {scale, zero};
}

at::Tensor quantize_rows(const at::Tensor& rows, const GroupParams& p, int bits, std::int64_t group) {
  const std::int64_t n = rows.size(0), in = rows.size(1);
  if (bits == 16) return rows.to(at::kHalf).view(at::kShort).to(at::kLong).bitwise_and(0xffff);
  const at::Tensor g = rows.to(at::kFloat).reshape({n, in / group, group});
  const at::Tensor s = p.scale.unsqueeze(-1), z = p.zero.to(at::kFloat).unsqueeze(-1);
  return (at::round(g / s) + z).clamp(0, (1 << bits) - 1).to(at::kLong).reshape({n, in});
}

at::Tensor dequantize_rows(const at::Tensor& codes, const GroupParams& p, int bits, std::int64_t group) {
  const std::int64_t n = codes.size(0), in = codes.size(1);
  if (bits == 16) return codes.to(at::kShort).view(at::kHalf).to(at::kFloat);
  const at::Tensor c = codes.to(at::kFloat).reshape({n, in / group, group});
  return ((c - p.zero.to(at::kFloat).unsqueeze(-1)) * p.scale.unsqueeze(-1)).reshape({n, in});
}

UnitBits unit_bits(std::int64_t rows, std::int64_t in, int bits, std::int64_t group) {
  UnitBits b;
  b.payload = rows * in * bits;
  b.metadata = rows * kRowMapBits + (bits <= kMaxCodeBits ? (in / group) * (kScaleBits + kZeroBits) : 0);
  return b;
}

at::Tensor pack_codes(const at::Tensor& codes, int bits) {
  const std::int64_t n = codes.size(0), in = codes.size(1), bytes = row_bytes(in, bits);
  const at::Tensor shifts = at::arange(bits, at::kLong);
  at::Tensor bit = codes.to(at::kLong).unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(1).to(at::kByte);
  bit = bit.reshape({n, in * bits});
  if (bytes * 8 != in * bits) bit = at::constant_pad_nd(bit, {0, bytes * 8 - in * bits}, 0);
  const at::Tensor weights = at::tensor({1, 2, 4, 8, 16, 32, 64, 128}, at::kLong);
  return (bit.reshape({n, bytes, 8}).to(at::kLong) * weights).sum(-1).to(at::kByte);
}

at::Tensor unpack_codes(const at::Tensor& packed, int bits, std::int64_t in) {
  const std::int64_t n = packed.size(0);
  const at::Tensor bit = packed.to(at::kLong).unsqueeze(-1).bitwise_right_shift(at::arange(8, at::kLong)).bitwise_and(1);
  const at::Tensor b = bit.reshape({n, -1}).slice(1, 0, in * bits).reshape({n, in, bits});
  return (b.bitwise_left_shift(at::arange(bits, at::kLong))).sum(-1);
}

}  // namespace csaq
