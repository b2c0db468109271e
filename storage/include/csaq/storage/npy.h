// NumPy .npy files holding 1-D token streams.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace csaq::storage {

// Reads a 1-D .npy array of int32, int64, uint16 or uint32 (little-endian, format versions
// 1-3) and returns it as an int64 tensor. Errors name the file: bad magic, unsupported
// dtype, not 1-D, Fortran order, or fewer data bytes than the header promises.
at::Tensor read_npy_tokens(const std::string& path);

// Writes a 1-D integer tensor as an int32 .npy file (format 1.0), atomically.
void write_npy_tokens(const std::string& path, const at::Tensor& tokens, bool overwrite = false);

}  // namespace csaq::storage
