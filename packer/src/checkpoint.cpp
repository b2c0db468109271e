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
  // Rank 0 decides for all: the same refusal on every rank, and one temporary name no other
  // run uses.
  std::string partial;
  decide_on_rank0(comm, [&] {
    storage::check_writable_target(path, overwrite);
    partial = storage::unique_sibling(path, "partial");
  });
  partial = broadcast_string(comm, partial);
  try {
    H5File f = H5File::create(partial, comm.size() > 1);
    body(f);
    // Every rank's checksums, gathered into one dataset (created by all, written by rank 0).
    nlohmann::json sums = nlohmann::json::object();
    nlohmann::json mine(f.written_checksums());
    for (int r = 0; r < comm.size(); ++r)
      sums.update(nlohmann::json::parse(broadcast_string(comm, comm.rank() == r ? mine.dump() : std::string(), r)));
    f.put_text(H5File::kChecksums, sums.dump(), comm.rank() == 0);
    f.close();
    comm.barrier();
    // On disk before it gets its name; without --overwrite never over a file that appeared.
    if (comm.rank() == 0) storage::durable_rename(partial, path, overwrite);
  } catch (...) {
    std::error_code ec;
    fs::remove(partial, ec);  // nothing half-written stays behind (the run ends on every rank)
    throw;
  }
  comm.barrier();
}

std::int64_t PackedLinear::stored_bits() const {
  return 8 * (3 * 8 + static_cast<std::int64_t>(formats.nbytes() + row_format.nbytes() + follower_pairs.nbytes() +
                                                 scales.nbytes() + zeros.nbytes() + codes.nbytes()));
}

namespace {
bool valid_bits(std::int64_t b) { return b == 1 || b == 2 || b == 3 || b == 4 || b == 8 || b == 16; }

// [n, G] mask of the parameter columns leaders with codes use (rows in order, then groups).
at::Tensor parameter_mask(const at::Tensor& leaders_coded, const at::Tensor& groups_per_row, std::int64_t width) {
  return at::logical_and(leaders_coded.unsqueeze(1), at::arange(width, at::kLong).unsqueeze(0) < groups_per_row.unsqueeze(1));
}

at::Tensor widths(std::int64_t count, std::int64_t bits) { return at::full({count}, bits, at::kLong); }
}  // namespace

PackedLinear pack_linear(const at::Tensor& weight, const LinearPlan& plan, const at::Tensor& hessian,
                         const QuantizerOptions& options, GptqFactorCache* cache) {
  GptqFactorCache own;
  const QuantizedLinear ql = quantize_linear(weight, plan, hessian, options, cache ? *cache : own);
  const RowSpec& spec = ql.spec;
  PackedLinear p;
  p.out = weight.size(0);
  p.in = weight.size(1);
  p.formats = formats_tensor(plan.formats);
  const int fb = index_bits(static_cast<std::int64_t>(plan.formats.size())), rb = index_bits(p.out);
  p.row_format = pack_bit_stream(plan.row_format.to(at::kLong), widths(fb > 0 ? p.out : 0, fb));
  const at::Tensor rows = at::arange(p.out, at::kLong), leader = plan.row_leader.to(at::kLong);
  const at::Tensor coded = spec.bits <= kMaxCodeBits;
  const at::Tensor follower = at::logical_and(leader != rows, coded).nonzero().reshape({-1});
  p.followers = follower.size(0);
  p.follower_pairs = pack_bit_stream(at::stack({follower, leader.index_select(0, follower)}, 1).reshape({-1}),
                                     widths(2 * p.followers, rb));
  const at::Tensor groups = at::where(coded, at::full_like(spec.group, p.in).div(spec.group.clamp_min(1), "floor"), at::zeros_like(spec.group));
  const at::Tensor mask = parameter_mask(at::logical_and(leader == rows, coded), groups, spec.scale.size(1));
  p.scales = spec.scale.masked_select(mask).to(at::kHalf);
  p.zeros = pack_bit_stream(spec.zero.masked_select(mask).to(at::kLong),
                            spec.bits.unsqueeze(1).expand_as(mask).masked_select(mask));
  const at::Tensor bytes_per_row = (spec.bits * p.in + 7).div(8, "floor");
  const at::Tensor offset = at::cat({at::zeros({1}, at::kLong), bytes_per_row.cumsum(0)});
  p.codes = at::zeros({offset[p.out].item<std::int64_t>()}, at::kByte);
  const at::Tensor distinct = std::get<0>(at::_unique(spec.bits, /*sorted=*/true));
  for (std::int64_t k = 0; k < distinct.size(0); ++k) {
    const int b = static_cast<int>(distinct[k].item<std::int64_t>());
    const at::Tensor sel = (spec.bits == b).nonzero().reshape({-1});
    const at::Tensor packed = pack_codes(ql.q.codes.index_select(0, sel), b);
    p.codes.index_put_({row_byte_index(offset.index_select(0, sel), row_bytes(p.in, b))}, packed.reshape({-1}));
  }
  return p;
}

LinearLayout decode_layout(const PackedLinear& p, const std::string& where) {
  auto fail_unless = [&](bool ok, const char* dataset, const std::string& what) {
    CSAQ_CHECK(ok, where, "/", dataset, ": ", what);
  };
  fail_unless(p.out >= 1 && p.in >= 1 && p.followers >= 0 && p.followers < p.out, "shape",
              "out, in, followers must be positive, positive, in [0, out)");
  fail_unless(p.formats.dim() == 2 && p.formats.size(1) == 2 && p.formats.size(0) >= 1, "formats", "must be [F >= 1, 2]");
  LinearLayout l;
  l.formats = formats_from_tensor(p.formats, where + "/formats");
  for (const Format& f : l.formats) {
    fail_unless(valid_bits(f.bits), "formats", std::to_string(f.bits) + " bits is not one of 1, 2, 3, 4, 8, 16");
    fail_unless(f.bits == 16 ? f.group == 0 : f.group >= 1 && p.in % f.group == 0, "formats",
                "group " + std::to_string(f.group) + " does not fit rows of " + std::to_string(p.in) + " at " +
                    std::to_string(f.bits) + " bits");
  }
  const auto F = static_cast<std::int64_t>(l.formats.size());
  const int fb = index_bits(F), rb = index_bits(p.out);
  fail_unless(p.row_format.numel() == (p.out * fb + 7) / 8, "row_format",
              "has " + std::to_string(p.row_format.numel()) + " bytes, expected " + std::to_string((p.out * fb + 7) / 8));
  l.row_format = fb > 0 ? unpack_bit_stream(p.row_format, widths(p.out, fb)) : at::zeros({p.out}, at::kLong);
  fail_unless((l.row_format < F).all().item<bool>(), "row_format", "names a format beyond the table");
  std::vector<std::int64_t> b, g;
  for (const Format& f : l.formats) {
    b.push_back(f.bits);
    g.push_back(f.group);
  }
  const at::Tensor bits = at::tensor(b, at::kLong).index_select(0, l.row_format);
  const at::Tensor group = at::tensor(g, at::kLong).index_select(0, l.row_format);
  const at::Tensor coded = bits <= kMaxCodeBits;
  fail_unless(p.follower_pairs.numel() == (2 * p.followers * rb + 7) / 8, "follower_pairs",
              "size does not match " + std::to_string(p.followers) + " followers");
  const at::Tensor pairs = unpack_bit_stream(p.follower_pairs, widths(2 * p.followers, rb)).view({p.followers, 2});
  const at::Tensor frow = pairs.select(1, 0), flead = pairs.select(1, 1);
  l.row_leader = at::arange(p.out, at::kLong);
  if (p.followers > 0) {
    fail_unless((frow < p.out).all().item<bool>() && (flead < p.out).all().item<bool>(), "follower_pairs",
                "names a row beyond the Linear");
    fail_unless(std::get<0>(at::_unique(frow)).numel() == p.followers, "follower_pairs", "names a row twice");
    l.row_leader.index_copy_(0, frow, flead);
    fail_unless(at::equal(l.row_leader.index_select(0, flead), flead), "follower_pairs", "a leader is itself a follower");
    fail_unless(at::equal(l.row_format.index_select(0, frow), l.row_format.index_select(0, flead)) &&
                    coded.index_select(0, frow).all().item<bool>(),
                "follower_pairs", "a follower's format differs from its leader's or has no scales");
  }
  const at::Tensor rows = at::arange(p.out, at::kLong);
  const at::Tensor groups = at::where(coded, at::full_like(group, p.in).div(group.clamp_min(1), "floor"), at::zeros_like(group));
  const std::int64_t width = coded.any().item<bool>() ? groups.max().item<std::int64_t>() : 1;
  const at::Tensor mask = parameter_mask(at::logical_and(l.row_leader == rows, coded), groups, width);
  const std::int64_t params = mask.sum().item<std::int64_t>();
  fail_unless(p.scales.dim() == 1 && p.scales.numel() == params, "scales",
              "has " + std::to_string(p.scales.numel()) + " values, the rows need " + std::to_string(params));
  const at::Tensor scale_values = p.scales.to(at::kFloat);
  fail_unless(at::isfinite(scale_values).all().item<bool>() && (scale_values > 0).all().item<bool>(), "scales",
              "holds a value that is not a positive finite number");
  const at::Tensor zero_widths = bits.unsqueeze(1).expand_as(mask).masked_select(mask);
  const std::int64_t zero_bits = zero_widths.sum().item<std::int64_t>();
  fail_unless(p.zeros.numel() == (zero_bits + 7) / 8, "zeros",
              "has " + std::to_string(p.zeros.numel()) + " bytes, expected " + std::to_string((zero_bits + 7) / 8));
  l.spec.bits = bits;
  l.spec.group = at::where(coded, group, at::zeros_like(group));
  l.spec.scale = at::ones({p.out, width}, at::kFloat).masked_scatter_(mask, scale_values);
  l.spec.zero = at::zeros({p.out, width}, at::kFloat).masked_scatter_(mask, unpack_bit_stream(p.zeros, zero_widths).to(at::kFloat));
  l.spec.scale = l.spec.scale.index_select(0, l.row_leader);
  l.spec.zero = l.spec.zero.index_select(0, l.row_leader);
  l.code_offset = at::cat({at::zeros({1}, at::kLong), (bits * p.in + 7).div(8, "floor").cumsum(0)});
  fail_unless(p.codes.numel() == l.code_offset[p.out].item<std::int64_t>(), "codes",
              "has " + std::to_string(p.codes.numel()) + " bytes, the rows' formats need " +
                  std::to_string(l.code_offset[p.out].item<std::int64_t>()));
  return l;
}

at::Tensor unpack_linear(const PackedLinear& p, const std::string& where) {
  const LinearLayout l = decode_layout(p, where);
  at::Tensor codes = at::zeros({p.out, p.in}, at::kLong);
  const at::Tensor distinct = std::get<0>(at::_unique(l.spec.bits, /*sorted=*/true));
  for (std::int64_t k = 0; k < distinct.size(0); ++k) {
    const int b = static_cast<int>(distinct[k].item<std::int64_t>());
    const at::Tensor rows = (l.spec.bits == b).nonzero().reshape({-1});
    const std::int64_t width = row_bytes(p.in, b);
    const at::Tensor bytes = p.codes.index_select(0, row_byte_index(l.code_offset.index_select(0, rows), width))
                                 .view({rows.size(0), width});
    codes.index_copy_(0, rows, unpack_codes(bytes, b, p.in));
  }
  return dequantize(codes, l.spec);
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

void write_checkpoint(const std::string& path, const ModelShard& model, const Plan& plan, const HessianOf& hessian_of,
                      const QuantizerOptions& quantizer, const std::string& report_json, at::ScalarType dense_dtype,
                      const std::vector<ModelFile>& model_files, Communicator& comm, bool overwrite,
                      const ProgressCallback& progress) {
  const ModelConfig& c = model.config();

  std::map<std::int64_t, PackedLinear> packed;  // by layer * kNumLinears + linear
  // Dataset sizes of every Linear, all-reduced so that every rank creates every dataset alike.
  constexpr int kSizes = 6;  // formats, row_format, follower_pairs, scales, zeros, codes
  at::Tensor sizes = at::zeros({c.num_layers * kNumLinears, kSizes}, at::kLong);
  GptqFactorCache cache;
  for (const LinearPlan& lp : plan.linears) {
    const at::Tensor& w = model.decoder()[lp.layer - model.layers().begin].linears[lp.linear].weight;
    PackedLinear p = pack_linear(w, lp, hessian_of ? hessian_of(lp.layer, lp.linear) : at::Tensor(), quantizer, &cache);
    const std::int64_t key = lp.layer * kNumLinears + lp.linear;
    const std::int64_t n[kSizes] = {p.formats.size(0), p.row_format.numel(), p.follower_pairs.numel(),
                                    p.scales.numel(), p.zeros.numel(), p.codes.numel()};
    for (int j = 0; j < kSizes; ++j) sizes[key][j] = n[j];
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
    for (std::int64_t l = 0; l < c.num_layers; ++l) {
      for (int i = 0; i < kNumLinears; ++i) {
        const std::int64_t key = l * kNumLinears + i;
        const std::string g = linear_group(l, i);
        const auto sz = [&](int j) { return sizes[key][j].item<std::int64_t>(); };
        f.create_dataset(g + "shape", at::kLong, {3});
        f.create_dataset(g + "formats", at::kInt, {sz(0), 2});
        f.create_dataset(g + "row_format", at::kByte, {sz(1)});
        f.create_dataset(g + "follower_pairs", at::kByte, {sz(2)});
        f.create_dataset(g + "scales", at::kHalf, {sz(3)});
        f.create_dataset(g + "zeros", at::kByte, {sz(4)});
        f.create_dataset(g + "codes", at::kByte, {sz(5)});
      }
    }
    const auto dense = dense_entries(model);
    for (const auto& e : dense) f.create_dataset("dense/" + e.name, dense_dtype, e.shape);
    // Each rank writes what it owns.
    if (rank0) f.write("format_version", at::tensor({kCheckpointFormatVersion}, at::kLong));
    for (const auto& [key, p] : packed) {
      const std::string g = linear_group(key / kNumLinears, static_cast<int>(key % kNumLinears));
      f.write(g + "shape", at::tensor({p.out, p.in, p.followers}, at::kLong));
      f.write(g + "formats", p.formats);
      f.write(g + "row_format", p.row_format);
      f.write(g + "follower_pairs", p.follower_pairs);
      f.write(g + "scales", p.scales);
      f.write(g + "zeros", p.zeros);
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
  CSAQ_CHECK(version == kCheckpointFormatVersion, "'", path, "' has checkpoint format version ", version,
             "; this csaq reads version ", kCheckpointFormatVersion,
             version < kCheckpointFormatVersion ? " (pack the model again with this csaq)" : "");
  config_ = ModelConfig::parse(f.read_text("config.json"), path + ":config.json");
}

QuantizedCheckpoint::~QuantizedCheckpoint() = default;

std::string QuantizedCheckpoint::report_json() const { return impl_->file.read_text("report.json"); }

PackedLinear QuantizedCheckpoint::linear(std::int64_t layer, int linear) const {
  const H5File& f = impl_->file;
  const std::string g = linear_group(layer, linear);
  PackedLinear p;
  const at::Tensor shape = f.read(g + "shape");
  CSAQ_CHECK(shape.numel() == 3 && shape.scalar_type() == at::kLong, "'", path_, "': ", g, "shape must be 3 int64");
  p.out = shape[0].item<std::int64_t>();
  p.in = shape[1].item<std::int64_t>();
  p.followers = shape[2].item<std::int64_t>();
  const auto shapes = linear_shapes(config_);
  CSAQ_CHECK(p.out == shapes[linear].first && p.in == shapes[linear].second, "'", path_, "': ", g, "shape is [", p.out,
             ", ", p.in, "] but config.json implies ", shape_str(std::vector<std::int64_t>{shapes[linear].first, shapes[linear].second}));
  auto read = [&](const char* name, at::ScalarType type) {
    at::Tensor t = f.read(g + name);
    CSAQ_CHECK(t.scalar_type() == type, "'", path_, "': ", g, name, " has type ", c10::toString(t.scalar_type()),
               ", expected ", c10::toString(type));
    return t;
  };
  p.formats = read("formats", at::kInt);
  p.row_format = read("row_format", at::kByte);
  p.follower_pairs = read("follower_pairs", at::kByte);
  p.scales = read("scales", at::kHalf);
  p.zeros = read("zeros", at::kByte);
  p.codes = read("codes", at::kByte);
  return p;
}

std::string QuantizedCheckpoint::linear_where(std::int64_t layer, int linear) const {
  const std::string g = linear_group(layer, linear);
  return "'" + path_ + "': " + g.substr(0, g.size() - 1);
}

at::Tensor QuantizedCheckpoint::tensor(const std::string& name) const {
  for (std::int64_t l = 0; l < config_.num_layers; ++l)
    for (int i = 0; i < kNumLinears; ++i)
      if (name == hf_linear_name(l, i)) {
        return unpack_linear(linear(l, i), linear_where(l, i));
      }
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
  std::error_code ec;
  fs::create_directories(dir, ec);
  CSAQ_CHECK(!ec, "cannot create directory '", dir, "': ", ec.message());
  const std::vector<storage::NamedPath> inputs{{"--quantized", ckpt.path()}};
  std::vector<storage::NamedPath> targets{{"--out", config_path}};
  for (const auto& m : model_files) targets.push_back({"--out", (fs::path(dir) / m.name).string()});
  storage::check_outputs(targets, inputs, overwrite);
  std::vector<storage::NamedTensor> tensors;
  for (const auto& name : ckpt.tensor_names()) tensors.emplace_back(name, ckpt.tensor(name).to(dtype).contiguous());
  std::vector<std::string> files = storage::write_safetensors_sharded(dir, tensors, max_shard_bytes, overwrite, inputs);
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
