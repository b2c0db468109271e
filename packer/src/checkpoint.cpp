#include "csaq/packer/checkpoint.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "csaq/solver/quantizer.h"
#include "csaq/storage/error.h"
#include "csaq/storage/files.h"
#include "csaq/storage/h5.h"
#include "csaq/storage/safetensors.h"

namespace csaq {
namespace fs = std::filesystem;
using storage::H5File;

namespace {

constexpr const char* kFormatName = "csaq-checkpoint";

std::string linear_group(std::int64_t layer, int linear) {
  return "linear/" + std::to_string(layer) + "/" + kLinearNames.at(linear) + "/";
}

// Rows [n] of a byte stream at per-row offsets, each `width` bytes long: [n, width] indices.
at::Tensor row_byte_index(const at::Tensor& offsets, std::int64_t width) {
  return (offsets.unsqueeze(1) + at::arange(width, at::kLong)).reshape({-1});
}

// Non-Linear tensors of the model, with the rank that holds them, in a fixed order.
struct DenseEntry {
  std::string name;
  std::vector<std::int64_t> shape;
  int owner;
};

std::vector<DenseEntry> dense_entries(const ModelShard& model) {
  const ModelConfig& c = model.config();
  const auto& part = model.partition();
  const int last = static_cast<int>(part.size()) - 1;
  std::vector<DenseEntry> out;
  out.push_back({kEmbedName, {c.vocab_size, c.hidden_size}, 0});
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    int owner = 0;
    while (!part[owner].contains(l)) ++owner;
    out.push_back({hf_layer_name(l, "input_layernorm.weight"), {c.hidden_size}, owner});
    out.push_back({hf_layer_name(l, "post_attention_layernorm.weight"), {c.hidden_size}, owner});
    const auto shapes = linear_shapes(c);
    for (int i = 0; i < kNumLinears; ++i)
      if (linear_has_bias(c, i)) out.push_back({hf_linear_name(l, i, "bias"), {shapes[i].first}, owner});
  }
  out.push_back({kFinalNormName, {c.hidden_size}, last});
  if (!c.tie_word_embeddings) out.push_back({kLmHeadName, {c.vocab_size, c.hidden_size}, last});
  return out;
}

at::Tensor dense_tensor(const ModelShard& model, const std::string& name) {
  if (name == kEmbedName) return model.embed_tokens();
  if (name == kFinalNormName) return model.final_norm();
  if (name == kLmHeadName) return model.lm_head();
  for (const DecoderLayer& layer : model.decoder()) {
    if (name == hf_layer_name(layer.index, "input_layernorm.weight")) return layer.input_norm;
    if (name == hf_layer_name(layer.index, "post_attention_layernorm.weight")) return layer.post_attention_norm;
    for (int i = 0; i < kNumLinears; ++i)
      if (name == hf_linear_name(layer.index, i, "bias")) return layer.linears[i].bias;
  }
  CSAQ_FAIL("internal error: rank ", model.rank(), " does not hold '", name, "'");
}

}  // namespace

void write_shared_h5(const std::string& path, bool overwrite, Communicator& comm,
                     const std::function<void(storage::H5File&)>& body) {
  at::Tensor refuse = at::zeros({1}, at::kInt);
  if (comm.rank() == 0 && !overwrite && fs::exists(path)) refuse.fill_(1);
  comm.broadcast(refuse, 0);
  CSAQ_CHECK(refuse.item<int>() == 0, "output '", path, "' already exists; pass --overwrite to replace it");
  const std::string partial = path + ".partial";
  {
    H5File f = H5File::create(partial, comm.size() > 1);
    body(f);
    f.close();
  }
  comm.barrier();
  if (comm.rank() == 0) storage::durable_rename(partial, path);  // on disk before it gets its name
  comm.barrier();
}

PackedLinear pack_linear(const at::Tensor& weight, const at::Tensor& row_bits, const at::Tensor& row_leader,
                         std::int64_t group_size) {
  PackedLinear p;
  const at::Tensor w = weight.detach().to(at::kFloat);
  p.out = w.size(0);
  p.in = w.size(1);
  p.group = effective_group(p.in, group_size);
  const at::Tensor bits = row_bits.to(at::kLong), leader = row_leader.to(at::kLong);
  CSAQ_ASSERT(at::equal(bits, bits.index_select(0, leader)), "a clique's rows must share their bits");
  const at::Tensor slot_leaders = at::logical_and(leader == at::arange(p.out, at::kLong), bits <= kMaxCodeBits)
                                      .nonzero().reshape({-1});
  const std::int64_t slots = slot_leaders.size(0), groups = p.in / p.group;
  at::Tensor slot_of = at::full({p.out}, -1, at::kLong);
  slot_of.index_put_({slot_leaders}, at::arange(slots, at::kLong));
  p.scale_slot = at::where(bits <= kMaxCodeBits, slot_of.index_select(0, leader), at::full_like(bits, -1)).to(at::kInt);
  at::Tensor scales = at::ones({slots, groups}, at::kFloat);
  p.zeros = at::zeros({slots, groups}, at::kByte);
  const at::Tensor bytes_per_row = (bits * p.in + 7).div(8, "floor");
  p.row_offset = at::cat({at::zeros({1}, at::kLong), bytes_per_row.cumsum(0)});
  p.codes = at::zeros({p.row_offset[p.out].item<std::int64_t>()}, at::kByte);
  const at::Tensor distinct = std::get<0>(at::_unique(bits, /*sorted=*/true));
  for (std::int64_t k = 0; k < distinct.size(0); ++k) {
    const int b = static_cast<int>(distinct[k].item<std::int64_t>());
    if (b <= kMaxCodeBits) {
      const at::Tensor lead = slot_leaders.index_select(0, (bits.index_select(0, slot_leaders) == b).nonzero().reshape({-1}));
      const GroupParams gp = group_params(w.index_select(0, lead), b, p.group);
      const at::Tensor at_slot = slot_of.index_select(0, lead);
      scales.index_put_({at_slot}, gp.scale);
      p.zeros.index_put_({at_slot}, gp.zero);
    }
  }
  for (std::int64_t k = 0; k < distinct.size(0); ++k) {
    const int b = static_cast<int>(distinct[k].item<std::int64_t>());
    const at::Tensor rows = (bits == b).nonzero().reshape({-1});
    GroupParams gp;
    if (b <= kMaxCodeBits) {
      const at::Tensor slot = p.scale_slot.index_select(0, rows).to(at::kLong);
      gp = {scales.index_select(0, slot), p.zeros.index_select(0, slot)};
    }
    const at::Tensor packed = pack_codes(quantize_rows(w.index_select(0, rows), gp, b, p.group), b);
    p.codes.index_put_({row_byte_index(p.row_offset.index_select(0, rows), row_bytes(p.in, b))}, packed.reshape({-1}));
  }
  p.row_bits = row_bits.to(at::kByte);
  p.row_leader = leader.to(at::kInt);
  p.scales = scales.to(at::kHalf);
  return p;
}

at::Tensor unpack_linear(const PackedLinear& p) {
  at::Tensor out = at::zeros({p.out, p.in}, at::kFloat);
  const at::Tensor bits = p.row_bits.to(at::kLong);
  const at::Tensor distinct = std::get<0>(at::_unique(bits, /*sorted=*/true));
  const at::Tensor scales = p.scales.to(at::kFloat);
  for (std::int64_t k = 0; k < distinct.size(0); ++k) {
    const int b = static_cast<int>(distinct[k].item<std::int64_t>());
    CSAQ_CHECK(b == 1 || b == 2 || b == 3 || b == 4 || b == 8 || b == 16, "checkpoint row with ", b, " bits");
    const at::Tensor rows = (bits == b).nonzero().reshape({-1});
    const std::int64_t width = row_bytes(p.in, b);
    const at::Tensor bytes = p.codes.index_select(0, row_byte_index(p.row_offset.index_select(0, rows), width))
                                 .view({rows.size(0), width});
    GroupParams gp;
    if (b <= kMaxCodeBits) {
      const at::Tensor slot = p.scale_slot.index_select(0, rows).to(at::kLong);
      gp = {scales.index_select(0, slot), p.zeros.index_select(0, slot)};
    }
    out.index_copy_(0, rows, dequantize_rows(unpack_codes(bytes, b, p.in), gp, b, p.group));
  }
  return out;
}

const std::vector<std::string>& model_file_names() {
  static const std::vector<std::string> names{
      "tokenizer.json",      "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
      "added_tokens.json",   "vocab.json",            "merges.txt",              "chat_template.jinja",
      "chat_template.json",  "generation_config.json"};
  return names;
}

std::vector<ModelFile> read_model_files(const std::string& model_dir, Communicator& comm) {
  std::string present;
  if (comm.rank() == 0)
    for (const auto& name : model_file_names())
      if (fs::is_regular_file(fs::path(model_dir) / name)) present += name + "\n";
  present = broadcast_string(comm, present);
  std::vector<ModelFile> files;
  for (std::size_t begin = 0, end; (end = present.find('\n', begin)) != std::string::npos; begin = end + 1) {
    ModelFile f{present.substr(begin, end - begin), {}};
    if (comm.rank() == 0) f.bytes = storage::read_text_file((fs::path(model_dir) / f.name).string());
    f.bytes = broadcast_string(comm, f.bytes);
    files.push_back(std::move(f));
  }
  return files;
}

void write_checkpoint(const std::string& path, const ModelShard& model, const Plan& plan, std::int64_t group_size,
                      const std::string& report_json, at::ScalarType dense_dtype,
                      const std::vector<ModelFile>& model_files, Communicator& comm, bool overwrite,
                      const ProgressCallback& progress) {
  const ModelConfig& c = model.config();

  std::map<std::int64_t, PackedLinear> packed;  // by layer * kNumLinears + linear
  at::Tensor sizes = at::zeros({c.num_layers * kNumLinears, 2}, at::kLong);  // slots, code bytes
  for (const LinearPlan& lp : plan.linears) {
    const at::Tensor& w = model.decoder()[lp.layer - model.layers().begin].linears[lp.linear].weight;
    PackedLinear p = pack_linear(w, lp.row_bits, lp.row_leader, group_size);
    const std::int64_t key = lp.layer * kNumLinears + lp.linear;
    sizes[key][0] = p.scales.size(0);
    sizes[key][1] = p.codes.size(0);
    packed.emplace(key, std::move(p));
    if (progress) progress(static_cast<std::int64_t>(packed.size()), static_cast<std::int64_t>(plan.linears.size()));
  }
  comm.all_reduce(sizes, ReduceOp::kSum);
  const std::string report = broadcast_string(comm, report_json);
  const bool rank0 = comm.rank() == 0;
  write_shared_h5(path, overwrite, comm, [&](H5File& f) {
    // Creation is collective: every rank, same datasets, same order.
    f.put_text("format", kFormatName, rank0);
    f.put_text("config.json", c.json_text, rank0);
    f.put_text("report.json", report, rank0);
    for (const auto& m : model_files) f.put_text("model_files/" + m.name, m.bytes, rank0);
    f.create_dataset("format_version", at::kLong, {1});
    const auto shapes = linear_shapes(c);
    for (std::int64_t l = 0; l < c.num_layers; ++l) {
      for (int i = 0; i < kNumLinears; ++i) {
        const std::int64_t key = l * kNumLinears + i;
        const std::string g = linear_group(l, i);
        const auto [out, in] = shapes[i];
        const std::int64_t groups = in / effective_group(in, group_size);
        const std::int64_t slots = sizes[key][0].item<std::int64_t>(), bytes = sizes[key][1].item<std::int64_t>();
        f.create_dataset(g + "shape", at::kLong, {3});
        f.create_dataset(g + "row_bits", at::kByte, {out});
        f.create_dataset(g + "row_leader", at::kInt, {out});
        f.create_dataset(g + "scale_slot", at::kInt, {out});
        f.create_dataset(g + "scales", at::kHalf, {slots, groups});
        f.create_dataset(g + "zeros", at::kByte, {slots, groups});
        f.create_dataset(g + "row_offset", at::kLong, {out + 1});
        f.create_dataset(g + "codes", at::kByte, {bytes});
      }
    }
    const auto dense = dense_entries(model);
    for (const auto& e : dense) f.create_dataset("dense/" + e.name, dense_dtype, e.shape);
    // Each rank writes what it owns.
    if (rank0) f.write("format_version", at::tensor({kCheckpointFormatVersion}, at::kLong));
    for (const auto& [key, p] : packed) {
      const std::string g = linear_group(key / kNumLinears, static_cast<int>(key % kNumLinears));
      f.write(g + "shape", at::tensor({p.out, p.in, p.group}, at::kLong));
      f.write(g + "row_bits", p.row_bits);
      f.write(g + "row_leader", p.row_leader);
      f.write(g + "scale_slot", p.scale_slot);
      f.write(g + "scales", p.scales);
      f.write(g + "zeros", p.zeros);
      f.write(g + "row_offset", p.row_offset);
      f.write(g + "codes", p.codes);
    }
    for (const auto& e : dense)
      if (e.owner == comm.rank()) f.write("dense/" + e.name, dense_tensor(model, e.name).detach().to(dense_dtype));
  });
}

struct QuantizedCheckpoint::Impl {
  H5File file;
};

QuantizedCheckpoint::QuantizedCheckpoint(const std::string& path) : path_(path) {
  impl_ = std::make_shared<Impl>(Impl{H5File::open_read(path)});
  const H5File& f = impl_->file;
  CSAQ_CHECK(f.exists("format") && f.read_text("format") == kFormatName, "'", path, "' is not a csaq checkpoint");
  const std::int64_t version = f.read("format_version")[0].item<std::int64_t>();
  CSAQ_CHECK(version >= 1 && version <= kCheckpointFormatVersion, "'", path, "' has checkpoint format version ",
             version, "; this csaq reads versions 1 to ", kCheckpointFormatVersion);
  config_ = ModelConfig::parse(f.read_text("config.json"), path + ":config.json");
}

QuantizedCheckpoint::~QuantizedCheckpoint() = default;

std::string QuantizedCheckpoint::report_json() const { return impl_->file.read_text("report.json"); }

PackedLinear QuantizedCheckpoint::linear(std::int64_t layer, int linear) const {
  const H5File& f = impl_->file;
  const std::string g = linear_group(layer, linear);
  PackedLinear p;
  const at::Tensor shape = f.read(g + "shape");
  p.out = shape[0].item<std::int64_t>();
  p.in = shape[1].item<std::int64_t>();
  p.group = shape[2].item<std::int64_t>();
  p.row_bits = f.read(g + "row_bits");
  p.row_leader = f.read(g + "row_leader");
  p.scale_slot = f.read(g + "scale_slot");
  p.scales = f.read(g + "scales");
  p.zeros = f.read(g + "zeros");
  p.row_offset = f.read(g + "row_offset");
  p.codes = f.read(g + "codes");
  CSAQ_CHECK(p.row_offset.numel() == p.out + 1 && p.row_offset[p.out].item<std::int64_t>() == p.codes.numel(),
             "'", path_, "': ", g, "row_offset does not match codes");
  return p;
}

at::Tensor QuantizedCheckpoint::tensor(const std::string& name) const {
  for (std::int64_t l = 0; l < config_.num_layers; ++l)
    for (int i = 0; i < kNumLinears; ++i)
      if (name == hf_linear_name(l, i)) return unpack_linear(linear(l, i));
  const std::string dense = "dense/" + name;
  return impl_->file.exists(dense) ? impl_->file.read(dense) : at::Tensor();
}

std::vector<std::string> QuantizedCheckpoint::tensor_names() const {
  std::vector<std::string> names = impl_->file.list("dense");
  for (std::int64_t l = 0; l < config_.num_layers; ++l)
    for (int i = 0; i < kNumLinears; ++i) names.push_back(hf_linear_name(l, i));
  return names;
}

std::vector<ModelFile> QuantizedCheckpoint::model_files() const {
  const H5File& f = impl_->file;
  std::vector<ModelFile> files;
  if (!f.exists("model_files")) return files;  // written before model files were kept
  for (const auto& name : f.list("model_files")) files.push_back({name, f.read_text("model_files/" + name)});
  return files;
}

storage::Tokenizer QuantizedCheckpoint::tokenizer() const {
  std::string json, config;
  for (const auto& m : model_files()) {
    if (m.name == "tokenizer.json") json = m.bytes;
    if (m.name == "tokenizer_config.json") config = m.bytes;
  }
  CSAQ_CHECK(!json.empty(), "checkpoint '", path_, "' keeps no tokenizer.json; pass the model's tokenizer (--tokenizer DIR)");
  return storage::Tokenizer::from_json(json, config, path_ + ":model_files/tokenizer.json");
}

TensorSource QuantizedCheckpoint::source() const {
  return {[this](const std::string& name) { return tensor(name); },
          [this](const std::string&) { return "checkpoint '" + path_ + "'"; }};
}

const char* dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: CSAQ_FAIL("cannot export in dtype ", c10::toString(dtype));
  }
}

at::ScalarType dtype_from_name(const std::string& name) {
  for (at::ScalarType t : {at::kFloat, at::kHalf, at::kBFloat16})
    if (name == dtype_name(t)) return t;
  return at::ScalarType::Undefined;
}

std::vector<std::string> export_checkpoint(const QuantizedCheckpoint& ckpt, const std::string& dir,
                                           at::ScalarType dtype, std::uint64_t max_shard_bytes, bool overwrite) {
  // config.json says what the weights are: transformers-5 configs name it "dtype", older ones
  // "torch_dtype".
  nlohmann::ordered_json config = nlohmann::ordered_json::parse(ckpt.config().json_text);
  config[config.contains("dtype") && !config.contains("torch_dtype") ? "dtype" : "torch_dtype"] = dtype_name(dtype);
  const std::vector<ModelFile> model_files = ckpt.model_files();
  const std::string config_path = (fs::path(dir) / "config.json").string();
  storage::check_writable_target(config_path, overwrite);
  for (const auto& m : model_files) storage::check_writable_target((fs::path(dir) / m.name).string(), overwrite);
  std::vector<storage::NamedTensor> tensors;
  for (const auto& name : ckpt.tensor_names()) tensors.emplace_back(name, ckpt.tensor(name).to(dtype).contiguous());
  std::vector<std::string> files = storage::write_safetensors_sharded(dir, tensors, max_shard_bytes, overwrite);
  for (const auto& m : model_files) {
    files.push_back((fs::path(dir) / m.name).string());
    storage::write_file_atomic(files.back(), m.bytes, overwrite);
  }
  // Last: a directory with config.json is a complete model.
  storage::write_file_atomic(config_path, config.dump(2) + "\n", overwrite);
  files.push_back(config_path);
  return files;
}

}  // namespace csaq
