#include "csaq/solver/quantizer.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <tuple>

#include "csaq/storage/error.h"

namespace csaq {

std::int64_t effective_group(std::int64_t in, std::int64_t group) {
  CSAQ_CHECK(group == -1 || group >= 1, "--group-options: a group must be -1 (whole row) or positive, got ", group);
  const std::int64_t g = group == -1 || group >= in ? in : group;
  CSAQ_CHECK(in % g == 0, "--group-options: ", group, " does not divide a Linear's ", in, " input features");
  return g;
}

std::vector<Format> linear_formats(std::int64_t in, const std::vector<int>& bit_options,
                                   const std::vector<std::int64_t>& group_options) {
  std::vector<Format> out;
  for (int b : bit_options) {
    if (b == 16) continue;
    for (std::int64_t g : group_options) {
      const Format f{b, effective_group(in, g)};
      if (std::find(out.begin(), out.end(), f) == out.end()) out.push_back(f);
    }
  }
  std::sort(out.begin(), out.end(),
            [](const Format& a, const Format& b) { return a.bits != b.bits ? a.bits < b.bits : a.group > b.group; });
  if (std::find(bit_options.begin(), bit_options.end(), 16) != bit_options.end()) out.push_back({16, 0});
  return out;
}

namespace {
at::Tensor fp16(const at::Tensor& x) { return x.to(at::kHalf).to(at::kFloat); }

// The integer code of w on scale s and zero z, clamped to [0, qmax] (qmax broadcasts).
at::Tensor code_of(const at::Tensor& w, const at::Tensor& s, const at::Tensor& z, const at::Tensor& qmax) {
  return at::minimum(at::maximum(at::round(w / s) + z, at::zeros_like(qmax)), qmax);
}
}  // namespace

GroupParams group_params(const at::Tensor& rows, int bits, std::int64_t group, const at::Tensor& column_weight,
                         const QuantizerOptions& opt) {
  CSAQ_ASSERT(bits >= 1 && bits <= kMaxCodeBits);
  const std::int64_t n = rows.size(0), in = rows.size(1);
  const at::Tensor g = rows.to(at::kFloat).reshape({n, in / group, group});
  const at::Tensor lo = std::get<0>(g.min(2)).clamp_max(0), hi = std::get<0>(g.max(2)).clamp_min(0);
  const at::Tensor qmax = at::full({}, static_cast<double>((1 << bits) - 1), at::kFloat);
  const at::Tensor c = column_weight.defined() ? column_weight.to(at::kFloat).reshape({1, in / group, group})
                                               : at::ones({1, in / group, group}, at::kFloat);
  GroupParams best;
  at::Tensor best_err;
  for (int k = 0; k <= opt.clip_steps; ++k) {
    const double alpha = opt.clip_steps == 0 ? 1.0 : 1.0 - opt.max_shrink * k / opt.clip_steps;
    at::Tensor s = fp16((hi - lo) * alpha / qmax);
    CSAQ_CHECK(at::isfinite(s).all().item<bool>(), "a weight group's range overflows fp16 scales");
    s = at::where(s > 0, s, at::ones_like(s));
    const at::Tensor z = at::round(-lo * alpha / s).clamp(0, (1 << bits) - 1);
    const at::Tensor q = code_of(g, s.unsqueeze(-1), z.unsqueeze(-1), qmax);
    const at::Tensor err = (((q - z.unsqueeze(-1)) * s.unsqueeze(-1) - g).square() * c).sum(2);
    if (k == 0) {
      best = {s, z};
      best_err = err;
      continue;
    }
    const at::Tensor better = err < best_err;  // ties keep the wider range
    best = {at::where(better, s, best.scale), at::where(better, z, best.zero)};
    best_err = at::where(better, err, best_err);
  }
  return best;
}

RowSpec make_row_spec(const at::Tensor& weight, const at::Tensor& bits, const at::Tensor& group,
                      const at::Tensor& leader, const at::Tensor& column_weight, const QuantizerOptions& opt) {
  const at::Tensor w = weight.detach().to(at::kFloat);
  const std::int64_t n = w.size(0), in = w.size(1);
  RowSpec spec{bits.to(at::kLong), group.to(at::kLong), {}, {}};
  const at::Tensor lead = leader.to(at::kLong);
  CSAQ_ASSERT(at::equal(spec.bits, spec.bits.index_select(0, lead)) && at::equal(spec.group, spec.group.index_select(0, lead)),
              "a clique's rows must share their format");
  const at::Tensor coded = spec.bits <= kMaxCodeBits;
  const std::int64_t smallest = coded.any().item<bool>() ? spec.group.masked_select(coded).min().item<std::int64_t>() : in;
  spec.scale = at::ones({n, in / smallest}, at::kFloat);
  spec.zero = at::zeros({n, in / smallest}, at::kFloat);
  const at::Tensor leaders = at::logical_and(lead == at::arange(n, at::kLong), coded).nonzero().reshape({-1});
  // One clip search per distinct format among the leaders.
  const at::Tensor key = spec.bits * (in + 1) + spec.group;
  const at::Tensor keys = std::get<0>(at::_unique(key.index_select(0, leaders), /*sorted=*/true));
  for (std::int64_t k = 0; k < keys.size(0); ++k) {
    const at::Tensor rows = leaders.masked_select(key.index_select(0, leaders) == keys[k]);
    const int b = static_cast<int>(spec.bits[rows[0]].item<std::int64_t>());
    const std::int64_t g = spec.group[rows[0]].item<std::int64_t>();
    const GroupParams p = group_params(w.index_select(0, rows), b, g, column_weight, opt);
    spec.scale.narrow(1, 0, in / g).index_copy_(0, rows, p.scale);
    spec.zero.narrow(1, 0, in / g).index_copy_(0, rows, p.zero);
  }
  spec.scale = spec.scale.index_select(0, lead);
  spec.zero = spec.zero.index_select(0, lead);
  return spec;
}

namespace {
// Per row, the parameter column of each of `cols` ([c] original column indices): [n, c].
at::Tensor param_index(const RowSpec& spec, const at::Tensor& cols) {
  const at::Tensor g = at::where(spec.bits <= kMaxCodeBits, spec.group, at::full_like(spec.group, 1 << 30));
  return cols.unsqueeze(0).div(g.unsqueeze(1), "floor");
}

at::Tensor qmax_of(const RowSpec& spec) {
  return (at::pow(2.0, spec.bits.clamp_max(kMaxCodeBits).to(at::kDouble)) - 1).to(at::kFloat);
}

at::Tensor fp16_bits(const at::Tensor& w) { return w.to(at::kHalf).view(at::kShort).to(at::kLong).bitwise_and(0xffff); }
}  // namespace

Quantized quantize_nearest(const at::Tensor& weight, const RowSpec& spec) {
  const at::Tensor w = weight.detach().to(at::kFloat);
  const at::Tensor idx = param_index(spec, at::arange(w.size(1), at::kLong));
  const at::Tensor s = spec.scale.gather(1, idx), z = spec.zero.gather(1, idx);
  const at::Tensor q = code_of(w, s, z, qmax_of(spec).unsqueeze(1));
  const at::Tensor full = (spec.bits == 16).unsqueeze(1);
  return {at::where(full, fp16_bits(w), q.to(at::kLong)), at::where(full, fp16(w), (q - z) * s)};
}

at::Tensor dequantize(const at::Tensor& codes, const RowSpec& spec) {
  const at::Tensor idx = param_index(spec, at::arange(codes.size(1), at::kLong));
  const at::Tensor s = spec.scale.gather(1, idx), z = spec.zero.gather(1, idx);
  const at::Tensor full = (spec.bits == 16).unsqueeze(1);
  const at::Tensor half = codes.bitwise_and(0xffff).to(at::kShort).view(at::kHalf).to(at::kFloat);
  return at::where(full, half, (codes.to(at::kFloat) - z) * s);
}

GptqFactor gptq_factor(const at::Tensor& hessian, const QuantizerOptions& opt) {
  // float64 copies of [in, in] are the largest transients of the solve and pack stages (for
  // a 70B's down_proj input, 6.6 GB each): at most two are alive at once here. The
  // permutation is applied in float32 (exact, as is the conversion), and a failed attempt
  // starts again from `hessian` rather than keeping an undamped copy.
  CSAQ_CHECK(at::isfinite(hessian).all().item<bool>(), "input Hessian is not finite");
  const std::int64_t n = hessian.size(0);
  // A column whose input was always 0 carries no information: give it a unit diagonal.
  const at::Tensor diag = hessian.diagonal().to(at::kDouble).masked_fill(hessian.diagonal() <= 0, 1.0);
  GptqFactor f;
  f.perm = opt.act_order ? std::get<1>(at::sort(diag, /*stable=*/true, 0, /*descending=*/true)) : at::arange(n, at::kLong);
  const at::Tensor permuted_diag = diag.index_select(0, f.perm);
  auto permuted = [&] {
    at::Tensor h = hessian.index_select(0, f.perm);
    h = h.index_select(1, f.perm).to(at::kDouble);
    h.diagonal().copy_(permuted_diag);
    return h;
  };
  double damp = -1;  // opt.damp x the mean diagonal, as the matrix's diagonal view sums it
  for (int attempt = 0;; ++attempt, damp *= 10) {
    at::Tensor lower, info;
    {
      at::Tensor damped = permuted();
      if (damp < 0) damp = opt.damp * damped.diagonal().mean().item<double>();
      damped.diagonal().add_(damp);
      std::tie(lower, info) = at::linalg_cholesky_ex(damped, /*upper=*/false, /*check_errors=*/false);
    }
    if (info.item<std::int64_t>() == 0) {
      at::Tensor inverse = at::cholesky_inverse(lower);
      lower = at::Tensor();
      auto [upper, info2] = at::linalg_cholesky_ex(inverse, /*upper=*/true, false);
      inverse = at::Tensor();
      if (info2.item<std::int64_t>() == 0) {
        f.hinv = upper.to(at::kFloat);
        return f;
      }
    }
    CSAQ_CHECK(attempt < 6, "input Hessian is not positive definite even with damping ", damp);
  }
}

Quantized quantize_gptq(const at::Tensor& weight, const RowSpec& spec, const GptqFactor& factor, std::int64_t block) {
  const std::int64_t n = weight.size(0), in = weight.size(1);
  at::Tensor w = weight.detach().to(at::kFloat).index_select(1, factor.perm).contiguous();
  at::Tensor codes = at::empty({n, in}, at::kLong), values = at::empty({n, in}, at::kFloat);
  const at::Tensor qmax = qmax_of(spec), full = spec.bits == 16, zero = at::zeros_like(qmax);
  const at::Tensor& u = factor.hinv;
  for (std::int64_t i1 = 0; i1 < in; i1 += block) {
    const std::int64_t i2 = std::min(in, i1 + block), count = i2 - i1;
    const at::Tensor idx = param_index(spec, factor.perm.slice(0, i1, i2));
    const at::Tensor s = spec.scale.gather(1, idx), z = spec.zero.gather(1, idx);
    at::Tensor w1 = w.slice(1, i1, i2).clone();
    at::Tensor err1 = at::empty({n, count}, at::kFloat);
    const at::Tensor u1 = u.slice(0, i1, i2).slice(1, i1, i2);
    const at::Tensor d = u1.diagonal();
    for (std::int64_t i = 0; i < count; ++i) {
      const at::Tensor col = w1.select(1, i), si = s.select(1, i), zi = z.select(1, i);
      const at::Tensor q = at::minimum(at::maximum(at::round(col / si) + zi, zero), qmax);
      const at::Tensor deq = at::where(full, fp16(col), (q - zi) * si);
      codes.select(1, i1 + i).copy_(at::where(full, fp16_bits(col), q.to(at::kLong)));
      values.select(1, i1 + i).copy_(deq);
      const at::Tensor err = at::where(full, zero, (col - deq) / d[i]);  // 16-bit rows keep their values
      if (i + 1 < count) w1.slice(1, i + 1, count).sub_(err.unsqueeze(1) * u1[i].slice(0, i + 1, count).unsqueeze(0));
      err1.select(1, i).copy_(err);
    }
    if (i2 < in) w.slice(1, i2, in).sub_(at::matmul(err1, u.slice(0, i1, i2).slice(1, i2, in)));
  }
  Quantized out{at::empty_like(codes), at::empty_like(values)};
  out.codes.index_copy_(1, factor.perm, codes);
  out.values.index_copy_(1, factor.perm, values);
  return out;
}

Quantized refine_codes(const at::Tensor& weight, const RowSpec& spec, const at::Tensor& hessian, const Quantized& start,
                       int sweeps, std::int64_t block) {
  const std::int64_t n = weight.size(0), in = weight.size(1);
  const at::Tensor h = hessian.to(at::kFloat).contiguous();
  const at::Tensor qmax = qmax_of(spec).contiguous();
  const at::Tensor coded = (spec.bits <= kMaxCodeBits).to(at::kByte).contiguous();
  Quantized q{start.codes.clone(), start.values.to(at::kFloat).clone()};
  // Δ H per row: the gradient of ½ Δ H Δᵀ, kept up to date as codes move: within a block of
  // columns at once, for the other columns after each block (as GPTQ's lazy updates).
  at::Tensor grad = at::matmul(q.values - weight.detach().to(at::kFloat), h);
  const at::Tensor order = std::get<1>(at::sort(h.diagonal(), /*stable=*/true, 0, /*descending=*/true));
  const float* qm = qmax.data_ptr<float>();
  const std::uint8_t* cd = coded.data_ptr<std::uint8_t>();
  for (int sweep = 0; sweep < sweeps; ++sweep) {
    bool changed = false;
    for (std::int64_t b0 = 0; b0 < in; b0 += block) {
      const at::Tensor cols = order.slice(0, b0, std::min(in, b0 + block));
      const std::int64_t count = cols.size(0);
      // The block's columns, [n, count] contiguous: a row's running Δ H is one run in memory.
      const at::Tensor hb = h.index_select(0, cols).index_select(1, cols).contiguous();
      const at::Tensor idx = param_index(spec, cols);
      const at::Tensor sc = spec.scale.gather(1, idx).contiguous(), ze = spec.zero.gather(1, idx).contiguous();
      at::Tensor g = grad.index_select(1, cols).contiguous(), v = q.values.index_select(1, cols).contiguous();
      at::Tensor c = q.codes.index_select(1, cols).contiguous();
      at::Tensor moves = at::zeros({n, count}, at::kFloat);
      float *gp = g.data_ptr<float>(), *vp = v.data_ptr<float>(), *mp = moves.data_ptr<float>();
      std::int64_t* cp = c.data_ptr<std::int64_t>();
      const float *hp = hb.data_ptr<float>(), *sp = sc.data_ptr<float>(), *zp = ze.data_ptr<float>();
      bool block_changed = false;
      for (std::int64_t i = 0; i < count; ++i) {
        const float hii = hp[i * count + i];
        if (!(hii > 0)) continue;
        for (std::int64_t r = 0; r < n; ++r) {
          if (!cd[r]) continue;
          const std::int64_t e = r * count + i;
          // Along this coordinate the error is a parabola with its minimum at v - grad / H_jj;
          // the code nearest that minimum is the best one.
          const float code = std::min(std::max(std::nearbyint((vp[e] - gp[e] / hii) / sp[e]) + zp[e], 0.0f), qm[r]);
          if (code == static_cast<float>(cp[e])) continue;
          const float next = (code - zp[e]) * sp[e];  // exactly what dequantize gives
          const float delta = next - vp[e];
          float* grow = gp + r * count;
          const float* hrow = hp + i * count;
          for (std::int64_t k = 0; k < count; ++k) grow[k] += delta * hrow[k];
          mp[e] += delta;
          vp[e] = next;
          cp[e] = static_cast<std::int64_t>(code);
          block_changed = true;
        }
      }
      if (!block_changed) continue;
      changed = true;
      grad.add_(at::matmul(moves, h.index_select(0, cols)));
      q.values.index_copy_(1, cols, v);
      q.codes.index_copy_(1, cols, c);
    }
    if (!changed) break;
  }
  return q;
}

const GptqFactor& GptqFactorCache::get(const at::Tensor& hessian, const QuantizerOptions& options) {
  if (!hessian_.defined() || !hessian_.is_same(hessian)) {
    factor_ = GptqFactor();
    hessian_ = at::Tensor();  // the previous input's matrix may be freed now
#ifdef __GLIBC__
    // The previous Linears' freed blocks go back to the system first, so that the float64
    // copies below start from a compact heap rather than add to its holes (docs/planning.md:
    // it lowered one rank's solve peak from 259-265 MB to 227 MB).
    malloc_trim(0);
#endif
    factor_ = gptq_factor(hessian, options);
    hessian_ = hessian;
  }
  return factor_;
}

int index_bits(std::int64_t count) {
  int b = 0;
  while ((std::int64_t{1} << b) < count) ++b;
  return b;
}

UnitBits unit_bits(std::int64_t rows, std::int64_t out, std::int64_t in, std::size_t num_formats, const Format& f) {
  UnitBits u;
  u.payload = rows * in * f.bits;
  const std::int64_t map = index_bits(static_cast<std::int64_t>(num_formats));
  u.metadata = rows * (row_bytes(in, f.bits) * 8 - in * f.bits + map);
  if (f.bits <= kMaxCodeBits && rows > 0)
    u.metadata += (in / f.group) * (16 + f.bits) + (rows - 1) * 2 * index_bits(out);
  return u;
}

std::int64_t linear_fixed_bits(std::size_t num_formats) {
  return 3 * 64 + static_cast<std::int64_t>(num_formats) * 2 * 32;
}

UnitBits linear_bits(std::int64_t out, std::int64_t in, const std::vector<Format>& formats,
                     const at::Tensor& row_format, const at::Tensor& row_leader) {
  auto bytes = [](std::int64_t bits) { return (bits + 7) / 8 * 8; };
  const at::Tensor fmt = row_format.to(at::kLong), lead = row_leader.to(at::kLong);
  const at::Tensor is_leader = lead == at::arange(out, at::kLong);
  std::vector<std::int64_t> b(formats.size()), g(formats.size());
  for (std::size_t i = 0; i < formats.size(); ++i) {
    b[i] = formats[i].bits;
    g[i] = formats[i].bits <= kMaxCodeBits ? in / formats[i].group : 0;
  }
  const at::Tensor bits = at::tensor(b, at::kLong).index_select(0, fmt);
  const at::Tensor groups = at::tensor(g, at::kLong).index_select(0, fmt);
  const at::Tensor coded = bits <= kMaxCodeBits;
  const std::int64_t followers = at::logical_and(~is_leader, coded).sum().item<std::int64_t>();
  const at::Tensor lead_groups = groups.masked_select(at::logical_and(is_leader, coded));
  const at::Tensor lead_bits = bits.masked_select(at::logical_and(is_leader, coded));
  UnitBits u;
  u.payload = bits.sum().item<std::int64_t>() * in;
  const std::int64_t codes = ((bits * in + 7).div(8, "floor") * 8).sum().item<std::int64_t>();
  const std::int64_t stored = linear_fixed_bits(formats.size()) +
                              bytes(out * index_bits(static_cast<std::int64_t>(formats.size()))) +
                              bytes(followers * 2 * index_bits(out)) + 16 * lead_groups.sum().item<std::int64_t>() +
                              bytes((lead_groups * lead_bits).sum().item<std::int64_t>()) + codes;
  u.metadata = stored - u.payload;
  return u;
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

namespace {
// [m, kmax] positions of every value's bits in the stream, and whether each bit exists.
std::pair<at::Tensor, at::Tensor> stream_positions(const at::Tensor& widths, std::int64_t kmax) {
  const at::Tensor w = widths.to(at::kLong);
  const at::Tensor start = w.cumsum(0) - w;
  const at::Tensor k = at::arange(kmax, at::kLong).unsqueeze(0);
  return {start.unsqueeze(1) + k, k < w.unsqueeze(1)};
}
}  // namespace

at::Tensor pack_bit_stream(const at::Tensor& values, const at::Tensor& widths) {
  const std::int64_t total = widths.numel() ? widths.sum().item<std::int64_t>() : 0;
  const std::int64_t bytes = (total + 7) / 8;
  if (total == 0) return at::zeros({0}, at::kByte);
  const std::int64_t kmax = widths.max().item<std::int64_t>();
  CSAQ_ASSERT(kmax <= 32);
  auto [pos, valid] = stream_positions(widths, kmax);
  const at::Tensor bit = values.to(at::kLong).unsqueeze(1).bitwise_right_shift(at::arange(kmax, at::kLong)).bitwise_and(1);
  at::Tensor stream = at::zeros({bytes * 8}, at::kLong);
  stream.index_put_({pos.masked_select(valid)}, bit.masked_select(valid));
  const at::Tensor weights = at::tensor({1, 2, 4, 8, 16, 32, 64, 128}, at::kLong);
  return (stream.reshape({bytes, 8}) * weights).sum(-1).to(at::kByte);
}

at::Tensor unpack_bit_stream(const at::Tensor& bytes, const at::Tensor& widths) {
  const std::int64_t m = widths.numel();
  if (m == 0) return at::zeros({0}, at::kLong);
  const std::int64_t kmax = std::max<std::int64_t>(1, widths.max().item<std::int64_t>());
  const std::int64_t total = widths.sum().item<std::int64_t>();
  CSAQ_ASSERT(bytes.numel() * 8 >= total, "bit stream shorter than its widths");
  const at::Tensor stream =
      bytes.to(at::kLong).unsqueeze(1).bitwise_right_shift(at::arange(8, at::kLong)).bitwise_and(1).reshape({-1});
  auto [pos, valid] = stream_positions(widths, kmax);
  const at::Tensor bit = at::where(valid, stream.index_select(0, pos.clamp_max(stream.numel() - 1).reshape({-1})).view({m, kmax}),
                                   at::zeros({m, kmax}, at::kLong));
  return bit.bitwise_left_shift(at::arange(kmax, at::kLong)).sum(1);
}

}  // namespace csaq
