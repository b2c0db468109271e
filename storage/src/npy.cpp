// The .npy header is a Python dict literal such as
//   {'descr': '<i4', 'fortran_order': False, 'shape': (39653,), }
// Only its three keys matter here; they are matched with std::regex and anything else in
// the header is rejected by the checks below (format spec: numpy.lib.format).
#include "csaq/storage/npy.h"

#include <ATen/ATen.h>

#include <cstring>
#include <regex>

#include "csaq/storage/error.h"
#include "csaq/storage/files.h"

namespace csaq::storage {

at::Tensor read_npy_tokens(const std::string& path) {
  MappedFile f(path);
  const std::string where = "token file '" + path + "'";
  const std::uint8_t* p = f.data();
  CSAQ_CHECK(f.size() >= 10 && std::memcmp(p, "\x93NUMPY", 6) == 0, where,
             ": not a .npy file (bad magic)");
  const int major = p[6];
  CSAQ_CHECK(major >= 1 && major <= 3, where, ": unsupported .npy format version ", major);
  std::size_t header_len = 0, header_start = 0;
  if (major == 1) {
    header_len = p[8] | (static_cast<std::size_t>(p[9]) << 8);
    header_start = 10;
  } else {
    CSAQ_CHECK(f.size() >= 12, where, ": truncated .npy header");
    header_len = p[8] | (static_cast<std::size_t>(p[9]) << 8) |
                 (static_cast<std::size_t>(p[10]) << 16) | (static_cast<std::size_t>(p[11]) << 24);
    header_start = 12;
  }
  CSAQ_CHECK(header_start + header_len <= f.size(), where, ": header length ", header_len,
             " runs past the end of the file (", f.size(), " bytes)");
  const std::string header(reinterpret_cast<const char*>(p + header_start), header_len);

  std::smatch m;
  CSAQ_CHECK(std::regex_search(header, m, std::regex(R"('descr'\s*:\s*'([^']*)')")), where,
             ": header has no 'descr'");
  const std::string descr = m[1];
  CSAQ_CHECK(std::regex_search(header, m, std::regex(R"('fortran_order'\s*:\s*(True|False))")),
             where, ": header has no 'fortran_order'");
  const bool fortran = m[1] == "True";
  CSAQ_CHECK(std::regex_search(header, m, std::regex(R"('shape'\s*:\s*\(([^)]*)\))")), where,
             ": header has no 'shape'");
  const std::string shape_text = m[1];

  std::size_t item = 0;
  if (descr == "<i4" || descr == "<u4") {
    item = 4;
  } else if (descr == "<i8") {
    item = 8;
  } else if (descr == "<u2") {
    item = 2;
  } else {
    CSAQ_FAIL(where, ": unsupported dtype '", descr,
              "' (token files must be 1-D little-endian int32, int64, uint16 or uint32)");
  }
  std::vector<std::int64_t> shape;
  const std::regex dim(R"(\s*(\d{1,18})\s*)");  // 18 digits: no int64 overflow
  std::size_t start = 0;
  while (start < shape_text.size()) {
    std::size_t comma = shape_text.find(',', start);
    std::string part = shape_text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (part.find_first_not_of(" \t") != std::string::npos) {
      CSAQ_CHECK(std::regex_match(part, m, dim), where, ": malformed shape (", shape_text, ")");
      shape.push_back(std::stoll(m[1]));
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  CSAQ_CHECK(shape.size() == 1, where, ": token arrays must be 1-D, this one has shape (",
             shape_text, ")");
  (void)fortran;  // irrelevant for 1-D data
  const std::int64_t n = shape[0];
  const std::size_t data_start = header_start + header_len;
  CSAQ_CHECK(f.size() - data_start >= static_cast<std::size_t>(n) * item, where, ": truncated: ",
             n, " tokens of ", item, " bytes need ", static_cast<std::size_t>(n) * item,
             " data bytes, the file has ", f.size() - data_start);

  const std::uint8_t* data = p + data_start;
  at::Tensor out = at::empty({n}, at::kLong);
  std::int64_t* dst = out.data_ptr<std::int64_t>();
  for (std::int64_t i = 0; i < n; ++i) {
    const std::uint8_t* q = data + static_cast<std::size_t>(i) * item;
    if (item == 2) {
      std::uint16_t v;
      std::memcpy(&v, q, 2);
      dst[i] = v;
    } else if (item == 4 && descr == "<u4") {
      std::uint32_t v;
      std::memcpy(&v, q, 4);
      dst[i] = v;
    } else if (item == 4) {
      std::int32_t v;
      std::memcpy(&v, q, 4);
      dst[i] = v;
    } else {
      std::memcpy(&dst[i], q, 8);
    }
  }
  return out;
}

void write_npy_tokens(const std::string& path, const at::Tensor& tokens, bool overwrite) {
  CSAQ_CHECK(tokens.dim() == 1, "write_npy_tokens('", path, "'): tokens must be 1-D");
  at::Tensor t = tokens.to(at::kInt).contiguous();
  std::string header = "{'descr': '<i4', 'fortran_order': False, 'shape': (" +
                       std::to_string(t.numel()) + ",), }";
  // Magic (6) + version (2) + length (2) + header + '\n' padded to a multiple of 64.
  const std::size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::string prefix("\x93NUMPY\x01\x00", 8);
  prefix += static_cast<char>(header.size() & 0xff);
  prefix += static_cast<char>((header.size() >> 8) & 0xff);
  AtomicFile out(path, overwrite);
  out.write(prefix);
  out.write(header);
  out.write(t.data_ptr(), static_cast<std::size_t>(t.numel()) * 4);
  out.commit();
}

}  // namespace csaq::storage
