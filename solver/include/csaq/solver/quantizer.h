// How one Linear's rows are quantized and what they cost in bits.
//
// A row is stored in a Format: b = 1, 2, 3, 4 or 8 bits per weight with, per `group` weights
// along the row, an fp16 scale and a b-bit zero-point (asymmetric uniform codes), or b = 16:
// the fp16 value itself. Follower rows of a clique use their leader's scales and zero-points.
//
// Group parameters come from a clip search: for each group the range [α·lo, α·hi]
// (lo = min(min w, 0), hi = max(max w, 0), so zero is a code) with the α in
// 1, 1 - s/steps, ..., 1 - s (s = max_shrink) that minimises Σ_j c_j (Q(w_j) - w_j)², where
// c is the diagonal of the Linear's input Hessian H = Σ_t x_t x_tᵀ (all ones without one).
// scale = fp16(range / (2^b - 1)) (1 for a group of zeros), zero = round(-α·lo / scale).
//
// Codes come from round-to-nearest, or from GPTQ: columns are quantized one at a time (in
// order of decreasing H_jj with act-order) and each one's error is pushed onto the columns not
// yet quantized through the Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, so that the
// Linear's output error ‖ΔW X‖ is what is minimised; then, with refine_sweeps, coordinate
// descent on the codes against that same error (refine_codes). Rows are independent of each other in
// both, so every row gets the same result whatever the formats of the other rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace csaq {

inline constexpr int kMaxCodeBits = 8;  // b <= 8 uses codes; 16 is fp16

struct Format {
  int bits = 16;
  std::int64_t group = 0;  // weights per scale (divides the row); 0 for 16 bits
  bool operator==(const Format& o) const { return bits == o.bits && group == o.group; }
  bool operator!=(const Format& o) const { return !(*this == o); }
};

// Group size actually used for rows of `in` values: `group`, or the whole row when it is -1
// or at least `in`. Throws when it does not divide `in`.
std::int64_t effective_group(std::int64_t in, std::int64_t group);

// The formats a Linear with `in` input features may use: every bit option (<= 8) with every
// group option, and 16 once if it is an option; duplicates removed; ordered by bits, then by
// group from the largest. The index of a format in this list is what a checkpoint stores.
std::vector<Format> linear_formats(std::int64_t in, const std::vector<int>& bit_options,
                                   const std::vector<std::int64_t>& group_options);

struct QuantizerOptions {
  bool gptq = true;        // false: round to nearest
  double damp = 0.01;      // GPTQ damping, a fraction of mean(diag H)
  bool act_order = true;   // GPTQ column order by decreasing diag H
  std::int64_t block = 128;  // GPTQ columns per lazy-update block
  int clip_steps = 20;     // 0: plain min/max ranges
  double max_shrink = 0.5;
  int refine_sweeps = 0;   // coordinate-descent passes over the codes afterwards (refine_codes)
};

// Scales and zero-points of rows [n, in] at `bits` (<= 8) and `group`: [n, in / group]
// float32 each (the scales hold fp16 values, the zero-points integers). `column_weight` [in]
// weights the clip search's error (undefined: all ones). Throws when a range overflows fp16.
struct GroupParams {
  at::Tensor scale;
  at::Tensor zero;
};
GroupParams group_params(const at::Tensor& rows, int bits, std::int64_t group, const at::Tensor& column_weight,
                         const QuantizerOptions& options);

// Everything that fixes how each row of a Linear is coded: per row its bits and group
// (int64 [n]; group 0 at 16 bits) and its parameters, [n, in / smallest group] float32
// (a row uses the first in / group columns).
struct RowSpec {
  at::Tensor bits;
  at::Tensor group;
  at::Tensor scale;
  at::Tensor zero;
};

// The spec of rows `weight` [n, in] at per-row formats `bits`/`group` [n], where row r uses
// the parameters of row `leader`[r] (a leader is its own; a clique shares one format).
RowSpec make_row_spec(const at::Tensor& weight, const at::Tensor& bits, const at::Tensor& group,
                      const at::Tensor& leader, const at::Tensor& column_weight, const QuantizerOptions& options);

// Codes [n, in] int64 (b-bit codes, or the fp16 bit pattern at 16 bits) and the values they
// stand for, float32 [n, in].
struct Quantized {
  at::Tensor codes;
  at::Tensor values;
};
Quantized quantize_nearest(const at::Tensor& weight, const RowSpec& spec);
at::Tensor dequantize(const at::Tensor& codes, const RowSpec& spec);

// GPTQ's factorisation of one Linear input's Hessian [in, in] (shared by the Linears that
// read that input). Throws when H is not finite.
struct GptqFactor {
  at::Tensor perm;  // [in] int64: column order
  at::Tensor hinv;  // [in, in] float32: upper Cholesky factor of the permuted (H + damp)⁻¹
};
GptqFactor gptq_factor(const at::Tensor& hessian, const QuantizerOptions& options);
Quantized quantize_gptq(const at::Tensor& weight, const RowSpec& spec, const GptqFactor& factor,
                        std::int64_t block = 128);

// Coordinate descent on the codes of `start` against each row's output error Δ H Δᵀ
// (Δ = values - weight), the parameters fixed: column by column (by decreasing H_jj), each
// coded weight moves to the code nearest the minimiser of the error along that coordinate;
// `sweeps` passes at most, fewer once a pass changes nothing. GPTQ is greedy (each column is
// rounded once, its error pushed onto the later ones); this lets earlier columns answer the
// later ones' rounding. No row's Δ H Δᵀ increases (up to float32 rounding); rows stay
// independent of each other.
Quantized refine_codes(const at::Tensor& weight, const RowSpec& spec, const at::Tensor& hessian, const Quantized& start,
                       int sweeps, std::int64_t block = 128);

// The factor of the last Hessian asked for, reused while the same tensor is asked for again
// (q/k/v share one input and so one factor, gate/up another, and they come one after the
// other). Not thread-safe.
class GptqFactorCache {
 public:
  const GptqFactor& get(const at::Tensor& hessian, const QuantizerOptions& options);

 private:
  at::Tensor hessian_;
  GptqFactor factor_;
};

// Bits in a checkpoint (format 2; docs/checkpoint-format.md), counted exactly: a row's codes
// take ceil(in·b / 8) bytes and its format index ceil(log2 F) bits (none when F = 1); a
// leader with b <= 8 adds per group an fp16 scale and a b-bit zero-point; a follower adds its
// row and its leader's row, ceil(log2 out) bits each. Per Linear: `shape` (3 int64), the
// formats table (F × 2 int32) and the padding of three bit-packed datasets to whole bytes.
struct UnitBits {
  std::int64_t payload = 0;   // codes proper: rows · in · b
  std::int64_t metadata = 0;  // everything else
  std::int64_t total() const { return payload + metadata; }
};
int index_bits(std::int64_t count);  // ceil(log2 count); 0 for count <= 1
// A unit (clique) of `rows` rows of a Linear [out, in] with `formats` formats, at `f`.
UnitBits unit_bits(std::int64_t rows, std::int64_t out, std::int64_t in, std::size_t num_formats, const Format& f);
// What a Linear stores besides its units: shape and formats table.
std::int64_t linear_fixed_bits(std::size_t num_formats);
inline constexpr std::int64_t kPaddingReserveBits = 3 * 7;  // bit-packed datasets end on byte boundaries
// The exact bits of a stored Linear, padding included (payload as in unit_bits).
UnitBits linear_bits(std::int64_t out, std::int64_t in, const std::vector<Format>& formats,
                     const at::Tensor& row_format, const at::Tensor& row_leader);

// Dense little-endian bit packing of codes [n, in] with `bits` bits each: every row starts
// on a byte boundary and takes ceil(in * bits / 8) bytes. Returns uint8 [n, row_bytes].
at::Tensor pack_codes(const at::Tensor& codes, int bits);
at::Tensor unpack_codes(const at::Tensor& packed, int bits, std::int64_t in);
inline std::int64_t row_bytes(std::int64_t in, int bits) { return (in * bits + 7) / 8; }
// One bit stream of values [m] (int64) with widths [m] (bits each, <= 32), value i at bit
// Σ_{k<i} widths_k, little-endian: uint8 [ceil(Σ widths / 8)]. And back.
at::Tensor pack_bit_stream(const at::Tensor& values, const at::Tensor& widths);
at::Tensor unpack_bit_stream(const at::Tensor& bytes, const at::Tensor& widths);

}  // namespace csaq
