// Asymmetric uniform b-bit quantization, group-wise along a row's input dimension.
//
// For each group of a leader row: lo = min(min(w), 0), hi = max(max(w), 0) (zero inside the
// range, so the zero-point is a valid code), scale = (hi - lo) / (2^b - 1) rounded UP to the
// next fp16 value (1 where that is 0), zero = round(-lo / scale) as uint8. A code is
// clamp(round(w / scale) + zero, 0, 2^b - 1) and dequantizes to (code - zero) * scale.
// Follower rows of a clique use their leader's scale and zero-point. b = 16 stores the value
// as fp16 (its bit pattern is the "code") and has no scale or zero-point.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace csaq {

inline constexpr int kMaxCodeBits = 8;  // b <= 8 uses codes; 16 is fp16

struct GroupParams {
  at::Tensor scale;  // [rows, groups] float32 holding fp16-exact values
  at::Tensor zero;   // [rows, groups] uint8
  GroupParams rows(const at::Tensor& index) const { return {scale.index_select(0, index), zero.index_select(0, index)}; }
};

// Group size actually used for rows of `in` values: `group_size`, or the whole row when
// group_size is -1 or at least `in`. Throws when it does not divide `in`.
std::int64_t effective_group(std::int64_t in, std::int64_t group_size);

// Parameters of every row of `rows` [n, in] as its own leader (bits <= 8).
GroupParams group_params(const at::Tensor& rows, int bits, std::int64_t group);
// rows [n, in] with row i quantized by p's row i -> codes [n, in] int64 (bits <= 8), or the
// fp16 bit patterns (bits == 16, p unused).
at::Tensor quantize_rows(const at::Tensor& rows, const GroupParams& p, int bits, std::int64_t group);
// codes [n, in] -> float32 [n, in].
at::Tensor dequantize_rows(const at::Tensor& codes, const GroupParams& p, int bits, std::int64_t group);

// Bits a unit of `rows` rows x `in` columns costs at `bits`: payload, and metadata
// (fp16 scale + uint8 zero-point per group of the leader when bits <= 8, plus a 40-bit
// per-row map: bits as uint8 and the leader's scale slot as int32).
struct UnitBits {
  std::int64_t payload = 0;
  std::int64_t metadata = 0;
  std::int64_t total() const { return payload + metadata; }
};
UnitBits unit_bits(std::int64_t rows, std::int64_t in, int bits, std::int64_t group);
inline constexpr int kScaleBits = 16, kZeroBits = 8, kRowMapBits = 40;

// Dense little-endian bit packing of codes [n, in] with `bits` bits each: every row starts
// on a byte boundary and takes ceil(in * bits / 8) bytes. Returns uint8 [n, row_bytes].
at::Tensor pack_codes(const at::Tensor& codes, int bits);
at::Tensor unpack_codes(const at::Tensor& packed, int bits, std::int64_t in);
inline std::int64_t row_bytes(std::int64_t in, int bits) { return (in * bits + 7) / 8; }

}  // namespace csaq
