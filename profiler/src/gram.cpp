#include "csaq/profiler/gram.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "csaq/storage/error.h"

namespace csaq {

GramMatrix::GramMatrix(std::int64_t n) : n_(n) {
  for (std::int64_t r0 = 0; r0 < n; r0 += kGramBlock)
    rows_.push_back(at::zeros({std::min(kGramBlock, n - r0), n - r0}, at::kFloat));
}

void GramMatrix::add(const at::Tensor& x) {
  CSAQ_ASSERT(x.dim() == 2 && x.size(1) == n_ && x.scalar_type() == at::kFloat);
  for (std::size_t b = 0; b < rows_.size(); ++b) {
    const std::int64_t r0 = static_cast<std::int64_t>(b) * kGramBlock;
    rows_[b].addmm_(x.slice(1, r0, r0 + rows_[b].size(0)).t(), x.slice(1, r0));
  }
}

at::Tensor GramMatrix::full() const {
  at::Tensor m = at::empty({n_, n_}, at::kFloat);
  for (std::size_t b = 0; b < rows_.size(); ++b) {
    const std::int64_t r0 = static_cast<std::int64_t>(b) * kGramBlock, rb = rows_[b].size(0), r1 = r0 + rb;
    const at::Tensor diagonal = rows_[b].slice(1, 0, rb);
    m.slice(0, r0, r1).slice(1, r0, r1).copy_(at::triu(diagonal) + at::triu(diagonal, 1).t());
    if (r1 < n_) {
      const at::Tensor right = rows_[b].slice(1, rb);
      m.slice(0, r0, r1).slice(1, r1).copy_(right);
      m.slice(0, r1).slice(1, r0, r1).copy_(right.t());
    }
  }
  return m;
}

void GramMatrix::assign(const at::Tensor& full) {
  CSAQ_ASSERT(full.dim() == 2 && full.size(0) == n_ && full.size(1) == n_);
  for (std::size_t b = 0; b < rows_.size(); ++b) {
    const std::int64_t r0 = static_cast<std::int64_t>(b) * kGramBlock;
    rows_[b].copy_(full.slice(0, r0, r0 + rows_[b].size(0)).slice(1, r0));
  }
}

std::int64_t GramMatrix::bytes_for(std::int64_t n) {
  std::int64_t floats = 0;
  for (std::int64_t r0 = 0; r0 < n; r0 += kGramBlock) floats += std::min(kGramBlock, n - r0) * (n - r0);
  return 4 * floats;
}

}  // namespace csaq
