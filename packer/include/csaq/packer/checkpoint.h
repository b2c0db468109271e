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

inline constexpr std::int64_t kCheckpointFormatVersion = 1;

// One Linear quantized by its plan, as stored.
struct PackedLinear {
  std::int64_t out = 0, in = 0, group = 0;
  at::Tensor row_bits;    // [out] uint8
  at::Tensor row_leader;  // [out] int32
  at::Tensor scale_slot;  // [out] int32: row of scales/zeros of the row's leader; -1 at 16 bits
  at::Tensor scales;      // [slots, groups] float16
  at::Tensor zeros;       // [slots, groups] uint8
  at::Tensor row_offset;  // [out + 1] int64: byte offset of each row in codes
  at::Tensor codes;       // [bytes] uint8
};

PackedLinear pack_linear(const at::Tensor& weight, const at::Tensor& row_bits, const at::Tensor& row_leader,
                         std::int64_t group_size);
// float32 [out, in]: what the packed Linear stands for.
at::Tensor unpack_linear(const PackedLinear& packed);

// Collective. Writes rank-owned data into one checkpoint at `path` (first under
// `path`.partial, renamed when every rank has finished). `report_json` is rank 0's text.
// Refuses an existing `path` unless `overwrite`. Dense tensors (embedding, norms, lm_head,
// biases) are stored in `dense_dtype`.
void write_checkpoint(const std::string& path, const ModelShard& model, const Plan& plan, std::int64_t group_size,
                      const std::string& report_json, at::ScalarType dense_dtype, Communicator& comm, bool overwrite);

// A checkpoint opened for reading (by any number of processes at once).
class QuantizedCheckpoint {
 public:
  explicit QuantizedCheckpoint(const std::string& path);
  ~QuantizedCheckpoint();
  const std::string& path() const { return path_; }
  const ModelConfig& config() const { return config_; }
  std::string report_json() const;
  PackedLinear linear(std::int64_t layer, int linear) const;
  // Tensors by Hugging Face name: Linear weights dequantized, the rest as stored.
  TensorSource source() const;
  // Every tensor name the checkpoint provides, in Hugging Face naming.
  std::vector<std::string> tensor_names() const;
  at::Tensor tensor(const std::string& name) const;  // undefined when absent

 private:
  std::string path_;
  ModelConfig config_;
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// Writes a dequantized Hugging Face checkpoint (config.json + safetensors, sharded above
// `max_shard_bytes`) that transformers loads. Returns the files written.
std::vector<std::string> export_checkpoint(const QuantizedCheckpoint& ckpt, const std::string& dir,
                                           at::ScalarType dtype, std::uint64_t max_shard_bytes, bool overwrite);

}  // namespace csaq
