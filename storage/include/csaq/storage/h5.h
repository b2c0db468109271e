// HDF5 files: one file written by all MPI ranks together (parallel HDF5), or read by one.
//
// Creating a file and its datasets is collective when the file is opened `collective`:
// every rank must make the same calls with the same arguments, in the same order; then each
// rank writes only the datasets (or rows) it owns. Paths such as "layers/3/q_proj/codes"
// create their groups as needed. Supported element types: float32/64, float16, bfloat16,
// int8/16/32/64, uint8. Errors name the file and the dataset. Not thread-safe.
//
// Integrity: the file records the CRC-32 of every dataset written whole by write(), and a
// file that holds "checksums.json" (name -> CRC-32, written by whoever closes the writing:
// see write_shared_h5) has every dataset checked against it on read(); a mismatch is an
// error naming the dataset.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace csaq::storage {

class H5File {
 public:
  // Creates (truncating) `path`. `collective`: opened by every rank of MPI_COMM_WORLD
  // through the MPI-IO driver (needs a parallel HDF5 build and MPI initialized).
  static H5File create(const std::string& path, bool collective);
  static H5File open_read(const std::string& path);

  H5File(H5File&& other) noexcept;
  H5File& operator=(H5File&& other) noexcept;
  ~H5File();

  const std::string& path() const { return path_; }
  void create_dataset(const std::string& name, at::ScalarType type, const std::vector<std::int64_t>& shape);
  // Writes the whole dataset from this process.
  void write(const std::string& name, const at::Tensor& data);
  // Creates and writes in one call (serial files, or data every rank holds identically).
  void put(const std::string& name, const at::Tensor& data);
  at::Tensor read(const std::string& name) const;
  bool exists(const std::string& name) const;
  std::vector<std::int64_t> shape(const std::string& name) const;
  // Names directly under a group ("" is the root), sorted.
  std::vector<std::string> list(const std::string& group) const;
  // Text stored as a 1-D uint8 dataset of UTF-8 bytes (easy to read from any language).
  // Creates the dataset (collective: same text on every rank) and writes it when `write`.
  void put_text(const std::string& name, const std::string& text, bool write = true);
  std::string read_text(const std::string& name) const;
  void close();

  // CRC-32 of every dataset this process wrote with write(), by name.
  const std::map<std::string, std::uint32_t>& written_checksums() const { return written_; }
  static constexpr const char* kChecksums = "checksums.json";

 private:
  H5File() = default;
  std::int64_t open_dataset(const std::string& name) const;
  void ensure_parents(const std::string& name);

  void verify(const std::string& name, const at::Tensor& data) const;

  std::string path_;
  std::int64_t file_ = -1;
  bool collective_ = false;
  std::map<std::string, std::uint32_t> written_;
  mutable bool expected_loaded_ = false;
  mutable std::map<std::string, std::uint32_t> expected_;
};

}  // namespace csaq::storage
