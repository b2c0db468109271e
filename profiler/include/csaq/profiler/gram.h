// Σ_t x_t x_tᵀ of a stream of inputs (GPTQ's input Hessian), stored as its upper triangle:
// row block b (rows [bB, bB + B) for B = kGramBlock) keeps columns bB.. only, so an n-wide
// input takes n(n + B)/2 floats instead of n² (a 70B's down_proj input: 1.7 GB, not 3.3).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace csaq {

inline constexpr std::int64_t kGramBlock = 256;

class GramMatrix {
 public:
  GramMatrix() = default;
  explicit GramMatrix(std::int64_t n);  // zeros, n x n

  bool defined() const { return n_ > 0; }
  std::int64_t size() const { return n_; }
  // += xᵀx for x [T, n] float32: one matrix product per row block (the diagonal block in
  // full, the rest above it).
  void add(const at::Tensor& x);
  // The whole [n, n] float32 matrix, exactly symmetric (the upper triangle mirrored).
  at::Tensor full() const;
  // Takes the upper triangle of a symmetric [n, n] matrix (as full() returns it).
  void assign(const at::Tensor& full);
  // Bytes kept for an n-wide input.
  static std::int64_t bytes_for(std::int64_t n);

 private:
  std::int64_t n_ = 0;
  std::vector<at::Tensor> rows_;  // block b: [rows of b, n - first row of b]
};

}  // namespace csaq
