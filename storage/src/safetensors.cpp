#include "csaq/storage/safetensors.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <sstream>

#include "csaq/storage/error.h"
#include "csaq/storage/files.h"

namespace csaq::storage {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct DTypeEntry {
  const char* name;
  std::size_t size;
  at::ScalarType scalar;
};

// Dtypes with a LibTorch equivalent. (U16/U32/U64 exist in the format but not in LibTorch
// 1.13; they are rejected with a message naming the tensor.)
constexpr DTypeEntry kDTypes[] = {
    {"F64", 8, at::kDouble}, {"F32", 4, at::kFloat}, {"F16", 2, at::kHalf},
    {"BF16", 2, at::kBFloat16}, {"I64", 8, at::kLong}, {"I32", 4, at::kInt},
    {"I16", 2, at::kShort}, {"I8", 1, at::kChar}, {"U8", 1, at::kByte},
    {"BOOL", 1, at::kBool},
};

const DTypeEntry* find_dtype(const std::string& name) {
  for (const auto& e : kDTypes)
    if (name == e.name) return &e;
  return nullptr;
}

const DTypeEntry& dtype_of_scalar(at::ScalarType t, const std::string& tensor) {
  for (const auto& e : kDTypes)
    if (e.scalar == t) return e;
  CSAQ_FAIL("tensor '", tensor, "': dtype ", c10::toString(t), " cannot be written to safetensors");
}

std::string supported_dtypes() {
  std::string out;
  for (const auto& e : kDTypes) out += std::string(out.empty() ? "" : ", ") + e.name;
  return out;
}

std::uint64_t read_le64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

std::size_t dtype_size(const std::string& dtype) {
  const DTypeEntry* e = find_dtype(dtype);
  CSAQ_CHECK(e != nullptr, "unsupported safetensors dtype '", dtype, "' (supported: ",
             supported_dtypes(), ")");
  return e->size;
}

const std::string& SafetensorsFile::path() const { return file_->path(); }

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  auto st = std::shared_ptr<SafetensorsFile>(new SafetensorsFile());
  st->file_ = std::make_shared<MappedFile>(path);
  const MappedFile& f = *st->file_;
  const std::string where = "safetensors file '" + path + "'";
  CSAQ_CHECK(f.size() >= 8, where, ": truncated: ", f.size(),
             " bytes, too short for the 8-byte header length");
  const std::uint64_t header_len = read_le64(f.data());
  CSAQ_CHECK(header_len <= f.size() - 8, where, ": header length ", header_len,
             " runs past the end of the file (", f.size(), " bytes)");
  st->data_start_ = 8 + header_len;
  const std::uint64_t data_size = f.size() - st->data_start_;

  json header;
  try {
    const char* begin = reinterpret_cast<const char*>(f.data() + 8);
    header = json::parse(begin, begin + header_len);
  } catch (const json::exception& e) {
    CSAQ_FAIL(where, ": malformed JSON header: ", e.what());
  }
  CSAQ_CHECK(header.is_object(), where, ": header is not a JSON object");

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      CSAQ_CHECK(entry.is_object(), where, ": __metadata__ is not an object");
      for (const auto& [k, v] : entry.items()) {
        CSAQ_CHECK(v.is_string(), where, ": __metadata__ value for '", k, "' is not a string");
        st->metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string at_tensor = where + ": tensor '" + name + "'";
    CSAQ_CHECK(entry.is_object(), at_tensor, ": entry is not an object");
    CSAQ_CHECK(entry.contains("dtype") && entry["dtype"].is_string(), at_tensor,
               ": missing or non-string 'dtype'");
    CSAQ_CHECK(entry.contains("shape") && entry["shape"].is_array(), at_tensor,
               ": missing or non-array 'shape'");
    CSAQ_CHECK(entry.contains("data_offsets") && entry["data_offsets"].is_array() &&
                   entry["data_offsets"].size() == 2,
               at_tensor, ": 'data_offsets' must be an array of two offsets");
    TensorInfo info;
    info.dtype = entry["dtype"].get<std::string>();
    const DTypeEntry* dt = find_dtype(info.dtype);
    CSAQ_CHECK(dt != nullptr, at_tensor, ": unsupported dtype '", info.dtype, "' (supported: ",
               supported_dtypes(), ")");
    std::uint64_t numel = 1;
    for (const auto& d : entry["shape"]) {
      CSAQ_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<std::int64_t>() >= 0),
                 at_tensor, ": shape ", entry["shape"].dump(), " has a non-integer or negative size");
      info.shape.push_back(d.get<std::int64_t>());
      const std::uint64_t size = d.get<std::uint64_t>();
      CSAQ_CHECK(size == 0 || numel <= (std::uint64_t{1} << 62) / size, at_tensor, ": shape ", entry["shape"].dump(),
                 " has more elements than any file can hold");
      numel *= size;
    }
    for (const auto& o : entry["data_offsets"])
      CSAQ_CHECK(o.is_number_unsigned() || (o.is_number_integer() && o.get<std::int64_t>() >= 0),
                 at_tensor, ": data_offsets ", entry["data_offsets"].dump(),
                 " are not non-negative integers");
    info.begin = entry["data_offsets"][0].get<std::uint64_t>();
    info.end = entry["data_offsets"][1].get<std::uint64_t>();
    CSAQ_CHECK(info.begin <= info.end && info.end <= data_size, at_tensor, ": data_offsets [",
               info.begin, ", ", info.end, "] out of range (the data section has ", data_size,
               " bytes)");
    CSAQ_CHECK(info.end - info.begin == numel * dt->size, at_tensor, ": byte count mismatch: ",
               info.dtype, " of shape ", shape_str(info.shape), " needs ", numel * dt->size,
               " bytes, data_offsets give ", info.end - info.begin);
    st->tensors_.emplace(name, std::move(info));
  }

  // Overlap: sort by start; each must start at or after the previous one's end.
  std::vector<std::pair<const std::string*, const TensorInfo*>> order;
  for (const auto& [name, info] : st->tensors_)
    if (info.end > info.begin) order.emplace_back(&name, &info);
  std::sort(order.begin(), order.end(),
            [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
  for (std::size_t i = 1; i < order.size(); ++i)
    CSAQ_CHECK(order[i].second->begin >= order[i - 1].second->end, where, ": tensors '",
               *order[i - 1].first, "' and '", *order[i].first, "' overlap (bytes [",
               order[i - 1].second->begin, ", ", order[i - 1].second->end, ") and [",
               order[i].second->begin, ", ", order[i].second->end, "))");
  return st;
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  auto it = tensors_.find(name);
  CSAQ_CHECK(it != tensors_.end(), "safetensors file '", path(), "' has no tensor '", name, "'");
  const TensorInfo& info = it->second;
  const DTypeEntry* dt = find_dtype(info.dtype);
  const std::uint8_t* ptr = file_->data() + data_start_ + info.begin;
  auto options = at::TensorOptions().dtype(dt->scalar);
  if (info.end == info.begin) return at::empty(info.shape, options);
  if (reinterpret_cast<std::uintptr_t>(ptr) % dt->size != 0) {
    at::Tensor copy = at::empty(info.shape, options);
    std::memcpy(copy.data_ptr(), ptr, info.end - info.begin);
    return copy;
  }
  std::shared_ptr<MappedFile> keep = file_;
  return at::from_blob(const_cast<std::uint8_t*>(ptr), info.shape,
                       [keep](void*) mutable { keep.reset(); }, options);
}

SafetensorsReader SafetensorsReader::open(const std::string& path) {
  SafetensorsReader r;
  std::error_code ec;
  std::string index;
  if (fs::is_directory(path, ec)) {
    const fs::path dir(path);
    if (fs::exists(dir / "model.safetensors.index.json", ec)) {
      index = (dir / "model.safetensors.index.json").string();
    } else if (fs::exists(dir / "model.safetensors", ec)) {
      auto file = SafetensorsFile::open((dir / "model.safetensors").string());
      r.dir_ = path;
      for (const auto& [name, info] : file->tensors()) r.weight_map_[name] = "model.safetensors";
      r.open_["model.safetensors"] = file;
      return r;
    } else {
      CSAQ_FAIL("model directory '", path,
                "' has neither model.safetensors nor model.safetensors.index.json");
    }
  } else if (path.size() > 11 && path.substr(path.size() - 11) == ".index.json") {
    index = path;
  } else {
    auto file = SafetensorsFile::open(path);
    const fs::path p(path);
    r.dir_ = p.parent_path().string();
    for (const auto& [name, info] : file->tensors()) r.weight_map_[name] = p.filename().string();
    r.open_[p.filename().string()] = file;
    return r;
  }

  r.index_path_ = index;
  r.dir_ = fs::path(index).parent_path().string();
  json j;
  try {
    j = json::parse(read_text_file(index));
  } catch (const json::exception& e) {
    CSAQ_FAIL("safetensors index '", index, "': malformed JSON: ", e.what());
  }
  CSAQ_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
             "safetensors index '", index, "': missing 'weight_map' object");
  for (const auto& [name, file] : j["weight_map"].items()) {
    CSAQ_CHECK(file.is_string(), "safetensors index '", index, "': weight_map entry '", name,
               "' is not a file name");
    const std::string f = file.get<std::string>();
    CSAQ_CHECK(f.find('/') == std::string::npos && f != ".." && !f.empty(),
               "safetensors index '", index, "': weight_map entry '", name,
               "' names a file outside the model directory: '", f, "'");
    r.weight_map_[name] = f;
  }
  return r;
}

bool SafetensorsReader::contains(const std::string& name) const {
  return weight_map_.count(name) != 0;
}

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : weight_map_) out.push_back(name);
  return out;
}

std::string SafetensorsReader::file_of(const std::string& name) const {
  auto it = weight_map_.find(name);
  CSAQ_CHECK(it != weight_map_.end(), "tensor '", name, "' is not in ",
             index_path_.empty() ? "the safetensors file in '" + dir_ + "'"
                                 : "safetensors index '" + index_path_ + "'");
  return (fs::path(dir_) / it->second).string();
}

std::shared_ptr<SafetensorsFile> SafetensorsReader::shard_for(const std::string& name) const {
  const std::string path = file_of(name);
  const std::string& file = weight_map_.at(name);
  auto it = open_.find(file);
  if (it == open_.end()) it = open_.emplace(file, SafetensorsFile::open(path)).first;
  CSAQ_CHECK(it->second->contains(name), "tensor '", name, "' is listed in safetensors index '",
             index_path_, "' but missing from '", path, "'");
  return it->second;
}

TensorInfo SafetensorsReader::info(const std::string& name) const {
  return shard_for(name)->tensors().at(name);
}

at::Tensor SafetensorsReader::load(const std::string& name) const {
  return shard_for(name)->tensor(name);
}

namespace {

// HF's layout: larger elements first (keeps every tensor aligned), then by name.
std::vector<const NamedTensor*> write_order(const std::vector<NamedTensor>& tensors) {
  std::vector<const NamedTensor*> order;
  for (const auto& t : tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const NamedTensor* a, const NamedTensor* b) {
    if (a->second.element_size() != b->second.element_size())
      return a->second.element_size() > b->second.element_size();
    return a->first < b->first;
  });
  return order;
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata, bool overwrite) {
  json header = json::object();
  json meta = json::object();
  meta["format"] = "pt";
  for (const auto& [k, v] : metadata) meta[k] = v;
  header["__metadata__"] = meta;
  std::uint64_t offset = 0;
  const auto order = write_order(tensors);
  for (const NamedTensor* t : order) {
    CSAQ_CHECK(t->second.defined(), "tensor '", t->first, "' is undefined; cannot write '", path, "'");
    CSAQ_CHECK(!header.contains(t->first), "tensor '", t->first, "' given twice for '", path, "'");
    const DTypeEntry& dt = dtype_of_scalar(t->second.scalar_type(), t->first);
    const std::uint64_t bytes = static_cast<std::uint64_t>(t->second.numel()) * dt.size;
    header[t->first] = {{"dtype", dt.name},
                        {"shape", t->second.sizes().vec()},
                        {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<std::uint8_t>(text.size() >> (8 * i));

  AtomicFile out(path, overwrite);
  out.write(len, 8);
  out.write(text);
  for (const NamedTensor* t : order) {
    at::Tensor c = t->second.detach().to(at::kCPU).contiguous();
    out.write(c.data_ptr(), static_cast<std::size_t>(c.numel()) * c.element_size());
  }
  out.commit();
}

std::vector<std::string> write_safetensors_sharded(const std::string& dir,
                                                   const std::vector<NamedTensor>& tensors,
                                                   std::uint64_t max_shard_bytes,
                                                   bool overwrite,
                                                   const std::vector<NamedPath>& inputs) {
  std::vector<std::vector<NamedTensor>> shards(1);
  std::uint64_t in_shard = 0, total = 0;
  for (const auto& t : tensors) {
    const std::uint64_t bytes = static_cast<std::uint64_t>(t.second.numel()) * t.second.element_size();
    if (!shards.back().empty() && in_shard + bytes > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(t);
    in_shard += bytes;
    total += bytes;
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  CSAQ_CHECK(!ec, "cannot create directory '", dir, "': ", ec.message());
  if (shards.size() == 1) {
    const std::string path = (fs::path(dir) / "model.safetensors").string();
    check_outputs({{"--out", path}}, inputs, overwrite);
    write_safetensors(path, shards[0], {}, overwrite);
    return {path};
  }
  auto shard_name = [&](std::size_t i) {
    std::ostringstream name;
    name << "model-" << std::setw(5) << std::setfill('0') << i + 1 << "-of-" << std::setw(5)
         << std::setfill('0') << shards.size() << ".safetensors";
    return name.str();
  };
  // Check every target first so that a refusal leaves nothing half-written.
  const std::string index_path = (fs::path(dir) / "model.safetensors.index.json").string();
  std::vector<NamedPath> targets{{"--out", index_path}};
  for (std::size_t i = 0; i < shards.size(); ++i) targets.push_back({"--out", (fs::path(dir) / shard_name(i)).string()});
  check_outputs(targets, inputs, overwrite);

  std::vector<std::string> written;
  json weight_map = json::object();
  for (std::size_t i = 0; i < shards.size(); ++i) {
    const std::string path = (fs::path(dir) / shard_name(i)).string();
    write_safetensors(path, shards[i], {}, overwrite);
    written.push_back(path);
    for (const auto& t : shards[i]) weight_map[t.first] = shard_name(i);
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  write_file_atomic(index_path, index.dump(2) + "\n", overwrite);
  written.push_back(index_path);
  return written;
}

}  // namespace csaq::storage
