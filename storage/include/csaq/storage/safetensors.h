// Reading and writing Hugging Face safetensors files, single and sharded.
//
// Format: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
// {dtype, shape, data_offsets} (plus an optional "__metadata__" string map), then the data.
// Files are memory-mapped; a reader opens only the shard files holding the tensors asked
// for, so each rank touches only what it owns. Every malformed input throws csaq::Error
// naming the file and, where there is one, the tensor.
#pragma once

#include "csaq/storage/files.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace csaq::storage {

class MappedFile;

// A tensor's entry in a safetensors header. `begin`/`end` are offsets into the data section.
struct TensorInfo {
  std::string dtype;  // safetensors spelling: "F32", "BF16", "I64", ...
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

// Bytes per element of a safetensors dtype; throws for an unknown one.
std::size_t dtype_size(const std::string& dtype);

// One mapped .safetensors file with a validated header. Thread-safe to read.
class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);

  const std::string& path() const;
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  // The tensor as stored, viewing the mapped file without a copy (copied only when the
  // data is misaligned for its dtype). The view is READ-ONLY memory and keeps the map alive;
  // call .clone() or .to() before modifying it.
  at::Tensor tensor(const std::string& name) const;

 private:
  std::shared_ptr<MappedFile> file_;
  std::uint64_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// The tensors of a model: a single .safetensors file, or a directory holding either
// model.safetensors or model.safetensors.index.json (sharded). Shards open lazily.
// Not thread-safe (shards are opened on first use).
class SafetensorsReader {
 public:
  // `path`: a .safetensors file, a *.safetensors.index.json file, or a model directory.
  static SafetensorsReader open(const std::string& path);

  bool contains(const std::string& name) const;
  std::vector<std::string> names() const;
  // The file that holds `name` (for messages); throws if absent.
  std::string file_of(const std::string& name) const;
  TensorInfo info(const std::string& name) const;
  // See SafetensorsFile::tensor: a read-only view of the mapped data.
  at::Tensor load(const std::string& name) const;

 private:
  std::shared_ptr<SafetensorsFile> shard_for(const std::string& name) const;

  std::string index_path_;                           // empty for a single file
  std::string dir_;                                  // shard file names are relative to it
  std::map<std::string, std::string> weight_map_;    // tensor -> shard file name
  mutable std::map<std::string, std::shared_ptr<SafetensorsFile>> open_;  // by file name
};

using NamedTensor = std::pair<std::string, at::Tensor>;

// Writes one .safetensors file (8-byte-aligned header, metadata {"format": "pt"} plus
// `metadata`), atomically: a temporary file renamed into place when complete. An existing
// `path` is an error unless `overwrite`.
void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {},
                       bool overwrite = false);

// Writes `tensors` into directory `dir` as model.safetensors when they fit in one shard of
// `max_shard_bytes`, else as model-0000i-of-0000N.safetensors plus
// model.safetensors.index.json, as Hugging Face does. Every target is checked first (against
// `inputs` too, see check_outputs), so a refusal writes nothing. Returns the files written.
std::vector<std::string> write_safetensors_sharded(const std::string& dir,
                                                   const std::vector<NamedTensor>& tensors,
                                                   std::uint64_t max_shard_bytes,
                                                   bool overwrite = false,
                                                   const std::vector<NamedPath>& inputs = {});

}  // namespace csaq::storage
