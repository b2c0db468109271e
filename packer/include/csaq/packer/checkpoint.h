// Stage 3: the quantized checkpoint, one HDF5 file written by all ranks (format:
// docs/checkpoint-format.md).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "csaq/shard/comm.h"
#include "csaq/shard/model.h"
#include "csaq/solver/solver.h"
#include "csaq/storage/tokenizer.h"

namespace csaq {
namespace storage {
class H5File;
}

// Collective: refuses an existing `path` unless `overwrite` (decided on rank 0 for all),
// creates `path`.partial on every rank (parallel HDF5 when there are several), lets `body`
// create and write datasets, closes, and renames it to `path` once every rank is done.
// A failure leaves `path` untouched.
void write_shared_h5(const std::string& path, bool overwrite, Communicator& comm,
                     const std::function<void(storage::H5File&)>& body);

inline constexpr std::int64_t kCheckpointFormatVersion = 2;

// One Linear quantized by its plan, as stored (docs/checkpoint-format.md). Bit streams are
// little-endian; nothing else is stored, so its bits are exactly what the report counts.
struct PackedLinear {
  std::int64_t out = 0, in = 0, followers = 0;  // the `shape` dataset
  at::Tensor formats;     // int32 [F, 2]: bits, group of each format
  at::Tensor row_format;  // uint8 bit stream: each row's format index, ceil(log2 F) bits (empty if F = 1)
  at::Tensor follower_pairs;  // uint8 bit stream: (row, leader) per follower, ceil(log2 out) bits each
  at::Tensor scales;      // float16 [Σ over leaders with b <= 8 of in / group], rows in order
  at::Tensor zeros;       // uint8 bit stream: those leaders' zero-points, b bits each
  at::Tensor codes;       // uint8: each row's codes, ceil(in·b / 8) bytes, rows in order
  std::int64_t stored_bits() const;  // 8 × the bytes of all of the above, `shape` included
};

// What a packed Linear says row by row, checked for consistency first: errors name `where`
// and the dataset at fault.
struct LinearLayout {
  std::vector<Format> formats;
  at::Tensor row_format;   // [out] int64
  at::Tensor row_leader;   // [out] int64
  RowSpec spec;            // bits, group, scales and zero-points of every row
  at::Tensor code_offset;  // [out + 1] int64 byte offsets into codes
};
LinearLayout decode_layout(const PackedLinear& packed, const std::string& where);

// Quantizes `weight` by `plan` (GPTQ on `hessian` when defined and the options say so) and
// encodes it.
PackedLinear pack_linear(const at::Tensor& weight, const LinearPlan& plan, const at::Tensor& hessian,
                         const QuantizerOptions& options, GptqFactorCache* cache = nullptr);
// float32 [out, in]: what the packed Linear stands for.
at::Tensor unpack_linear(const PackedLinear& packed, const std::string& where = "packed Linear");

// The input Hessian of a Linear on this rank (undefined: round to nearest).
using HessianOf = std::function<at::Tensor(std::int64_t layer, int linear)>;

// A file of the source model directory other than config.json and the weights, kept in the
// checkpoint so that an export is a complete model directory.
struct ModelFile {
  std::string name;   // e.g. "tokenizer.json"
  std::string bytes;  // contents, as is
};
// The names such files may have: tokenizer files, chat templates, generation settings.
const std::vector<std::string>& model_file_names();
// Collective: those of them present in `model_dir`, as rank 0 reads them, on every rank.
std::vector<ModelFile> read_model_files(const std::string& model_dir, Communicator& comm);

// Collective. Quantizes and writes rank-owned data into one checkpoint at `path` (first under
// `path`.partial, renamed when every rank has finished). `report_json` is rank 0's text.
// Refuses an existing `path` unless `overwrite`. Dense tensors (embedding, norms, lm_head,
// biases) are stored in `dense_dtype`. `model_files` must be the same on every rank.
// `progress` hears of each of this rank's Linears packed.
void write_checkpoint(const std::string& path, const ModelShard& model, const Plan& plan, const HessianOf& hessian_of,
                      const QuantizerOptions& quantizer, const std::string& report_json, at::ScalarType dense_dtype,
                      const std::vector<ModelFile>& model_files, Communicator& comm, bool overwrite,
                      const ProgressCallback& progress = {});

// A checkpoint opened for reading (by any number of processes at once).
class QuantizedCheckpoint {
 public:
  explicit QuantizedCheckpoint(const std::string& path);
  ~QuantizedCheckpoint();
  const std::string& path() const { return path_; }
  const ModelConfig& config() const { return config_; }
  std::string report_json() const;
  PackedLinear linear(std::int64_t layer, int linear) const;
  // "'<file>': linear/<layer>/<module>", the prefix of that Linear's datasets, for messages.
  std::string linear_where(std::int64_t layer, int linear) const;
  // Tensors by Hugging Face name: Linear weights dequantized, the rest as stored.
  TensorSource source() const;
  // Every tensor name the checkpoint provides, in Hugging Face naming.
  std::vector<std::string> tensor_names() const;
  at::Tensor tensor(const std::string& name) const;  // undefined when absent
  // The source model's tokenizer and generation files kept in the checkpoint.
  std::vector<ModelFile> model_files() const;
  // The tokenizer those files hold (tokenizer.json); throws asking for --tokenizer if none.
  storage::Tokenizer tokenizer() const;

 private:
  std::string path_;
  ModelConfig config_;
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// Hugging Face's name of a float dtype ("float32", "float16", "bfloat16"); throws for others.
const char* dtype_name(at::ScalarType dtype);
// Its inverse; Undefined for any other name.
at::ScalarType dtype_from_name(const std::string& name);

// Writes a dequantized Hugging Face checkpoint (config.json with its dtype set to `dtype`,
// safetensors sharded above `max_shard_bytes`, and the model files kept in the checkpoint)
// that transformers loads. Every target is checked before anything is written. Returns the
// files written.
std::vector<std::string> export_checkpoint(const QuantizedCheckpoint& ckpt, const std::string& dir,
                                           at::ScalarType dtype, std::uint64_t max_shard_bytes, bool overwrite);

}  // namespace csaq
