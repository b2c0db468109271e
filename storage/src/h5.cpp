#include "csaq/storage/h5.h"

#include <hdf5.h>
#include <sys/statvfs.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "csaq/storage/error.h"
#include "csaq/storage/files.h"

namespace csaq::storage {
namespace {

// The innermost HDF5 error message, for context in csaq errors.
std::string h5_message() {
  std::string msg;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD,
           [](unsigned, const H5E_error2_t* e, void* out) -> herr_t {
             auto* m = static_cast<std::string*>(out);
             if (e->desc != nullptr) {
               // A failed system call comes as a long record; its "error message = '...'" is the news.
               const std::string d = e->desc;
               const std::size_t at = d.find("error message = '");
               const std::size_t end = at == std::string::npos ? at : d.find('\'', at + 17);
               *m = end == std::string::npos ? d : d.substr(at + 17, end - at - 17);
             }
             return 0;
           },
           &msg);
  H5Eclear2(H5E_DEFAULT);
  return msg.empty() ? "unknown HDF5 error" : msg;
}

#define CSAQ_H5(call, ...)                                                     \
  [&] {                                                                        \
    auto csaq_h5_rc_ = (call);                                                 \
    CSAQ_CHECK(csaq_h5_rc_ >= 0, __VA_ARGS__, ": ", h5_message());             \
    return csaq_h5_rc_;                                                        \
  }()

// Said after a failed write to `path`: MPI-IO reports a full disk only as "file write failed",
// so the free space of the file's filesystem is given, and named when it has run out.
std::string space_note(const std::string& path) {
  struct statvfs st {};
  const std::string dir = std::filesystem::path(path).parent_path().string();
  if (::statvfs(dir.empty() ? "." : dir.c_str(), &st) != 0) return "";
  const unsigned long long free_bytes = static_cast<unsigned long long>(st.f_bavail) * st.f_frsize;
  return (free_bytes < (1ull << 20) ? " (No space left on device: " : " (") + std::to_string(free_bytes) +
         " bytes free on its filesystem)";
}

// Little-endian file types that are also the in-memory types (no conversion on write).
hid_t make_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return H5Tcopy(H5T_IEEE_F32LE);
    case at::kDouble: return H5Tcopy(H5T_IEEE_F64LE);
    case at::kChar: return H5Tcopy(H5T_STD_I8LE);
    case at::kByte: return H5Tcopy(H5T_STD_U8LE);
    case at::kShort: return H5Tcopy(H5T_STD_I16LE);
    case at::kInt: return H5Tcopy(H5T_STD_I32LE);
    case at::kLong: return H5Tcopy(H5T_STD_I64LE);
    case at::kHalf:
    case at::kBFloat16: {
      // IEEE half (1-5-10) or bfloat16 (1-8-7), as h5py and other readers define them.
      const bool half = t == at::kHalf;
      hid_t f = H5Tcopy(H5T_IEEE_F32LE);
      H5Tset_fields(f, 15, half ? 10 : 7, half ? 5 : 8, 0, half ? 10 : 7);
      H5Tset_size(f, 2);
      H5Tset_ebias(f, half ? 15 : 127);
      return f;
    }
    default: CSAQ_FAIL("HDF5 storage does not support ", c10::toString(t), " tensors");
  }
}

at::ScalarType scalar_of(hid_t type) {
  const H5T_class_t cls = H5Tget_class(type);
  const std::size_t size = H5Tget_size(type);
  if (cls == H5T_FLOAT) {
    if (size == 8) return at::kDouble;
    if (size == 4) return at::kFloat;
    if (size == 2) {
      std::size_t spos, epos, esize, mpos, msize;
      H5Tget_fields(type, &spos, &epos, &esize, &mpos, &msize);
      return esize == 8 ? at::kBFloat16 : at::kHalf;
    }
  } else if (cls == H5T_INTEGER) {
    const bool is_signed = H5Tget_sign(type) == H5T_SGN_2;
    if (size == 1) return is_signed ? at::kChar : at::kByte;
    if (size == 2 && is_signed) return at::kShort;
    if (size == 4 && is_signed) return at::kInt;
    if (size == 8 && is_signed) return at::kLong;
  }
  return at::ScalarType::Undefined;
}

std::uint32_t crc_of(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return crc32_of(c.data_ptr(), c.nbytes());
}

struct Handle {  // closes an HDF5 id of any kind
  hid_t id;
  herr_t (*close)(hid_t);
  ~Handle() {
    if (id >= 0) close(id);
  }
};

}  // namespace

H5File H5File::create(const std::string& path, bool collective) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  H5File f;
  f.path_ = path;
  f.collective_ = collective;
  Handle fapl{H5Pcreate(H5P_FILE_ACCESS), H5Pclose};
  if (collective) {
#ifdef H5_HAVE_PARALLEL
    CSAQ_H5(H5Pset_fapl_mpio(fapl.id, MPI_COMM_WORLD, MPI_INFO_NULL), "HDF5 MPI-IO setup for '", path, "'");
#else
    CSAQ_FAIL("cannot write '", path, "' from several ranks: this HDF5 build is serial");
#endif
  }
  f.file_ = CSAQ_H5(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.id), "cannot create HDF5 file '", path, "'");
  return f;
}

H5File H5File::open_read(const std::string& path) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  H5File f;
  f.path_ = path;
  CSAQ_CHECK(H5Fis_hdf5(path.c_str()) > 0, "'", path, "' is not an HDF5 file (or cannot be read)");
  f.file_ = CSAQ_H5(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), "cannot open HDF5 file '", path, "'");
  return f;
}

H5File::H5File(H5File&& o) noexcept
    : path_(std::move(o.path_)),
      file_(o.file_),
      collective_(o.collective_),
      written_(std::move(o.written_)),
      expected_loaded_(o.expected_loaded_),
      expected_(std::move(o.expected_)) {
  o.file_ = -1;
}

H5File& H5File::operator=(H5File&& o) noexcept {
  if (this != &o) {
    if (file_ >= 0) H5Fclose(file_);
    path_ = std::move(o.path_);
    file_ = o.file_;
    collective_ = o.collective_;
    written_ = std::move(o.written_);
    expected_loaded_ = o.expected_loaded_;
    expected_ = std::move(o.expected_);
    o.file_ = -1;
  }
  return *this;
}

H5File::~H5File() {
  // Closing a file opened by every rank is collective: while an error unwinds the stack the
  // other ranks are elsewhere, so it would wait for ever. The run is ending (main aborts
  // every rank); leave the file to that.
  if (file_ >= 0 && !(collective_ && std::uncaught_exceptions() > 0)) H5Fclose(file_);
}

void H5File::close() {
  if (file_ < 0) return;
  const herr_t rc = H5Fclose(file_);
  file_ = -1;
  CSAQ_CHECK(rc >= 0, "cannot close HDF5 file '", path_, "': ", h5_message(), space_note(path_));
}

void H5File::ensure_parents(const std::string& name) {
  for (std::size_t pos = name.find('/'); pos != std::string::npos; pos = name.find('/', pos + 1)) {
    const std::string group = name.substr(0, pos);
    if (H5Lexists(file_, group.c_str(), H5P_DEFAULT) > 0) continue;
    Handle g{CSAQ_H5(H5Gcreate2(file_, group.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                     "cannot create group '", group, "' in '", path_, "'"),
             H5Gclose};
  }
}

void H5File::create_dataset(const std::string& name, at::ScalarType type, const std::vector<std::int64_t>& shape) {
  ensure_parents(name);
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  Handle space{H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose};
  Handle t{make_type(type), H5Tclose};
  Handle dcpl{H5Pcreate(H5P_DATASET_CREATE), H5Pclose};
  H5Pset_fill_time(dcpl.id, H5D_FILL_TIME_NEVER);
  H5Pset_alloc_time(dcpl.id, H5D_ALLOC_TIME_EARLY);
  Handle d{CSAQ_H5(H5Dcreate2(file_, name.c_str(), t.id, space.id, H5P_DEFAULT, dcpl.id, H5P_DEFAULT),
                   "cannot create dataset '", name, "' in '", path_, "'", space_note(path_)),
           H5Dclose};
}

std::int64_t H5File::open_dataset(const std::string& name) const {
  CSAQ_CHECK(exists(name), "HDF5 file '", path_, "' has no dataset '", name, "'");
  return CSAQ_H5(H5Dopen2(file_, name.c_str(), H5P_DEFAULT), "cannot open dataset '", name, "' in '", path_, "'");
}

// Test hook: with CSAQ_FAULT_ENOSPC_AFTER=N in the environment, the process's dataset writes
// after the first N fail the way a full disk makes them fail.
bool injected_disk_full() {
  static long countdown = [] {
    const char* v = std::getenv("CSAQ_FAULT_ENOSPC_AFTER");
    return v != nullptr ? std::atol(v) : -1L;
  }();
  if (countdown < 0) return false;
  if (countdown == 0) return true;
  --countdown;
  return false;
}

void H5File::write(const std::string& name, const at::Tensor& data) {
  CSAQ_CHECK(!injected_disk_full(), "cannot write dataset '", name, "' in '", path_,
             "': No space left on device (injected by CSAQ_FAULT_ENOSPC_AFTER)");
  Handle d{open_dataset(name), H5Dclose};
  Handle space{H5Dget_space(d.id), H5Sclose};
  const hssize_t n = H5Sget_simple_extent_npoints(space.id);
  CSAQ_CHECK(n == data.numel(), "dataset '", name, "' in '", path_, "' holds ", n, " elements, got ", data.numel());
  if (n == 0) return;
  const at::Tensor c = data.contiguous();
  Handle t{make_type(c.scalar_type()), H5Tclose};
  CSAQ_H5(H5Dwrite(d.id, t.id, H5S_ALL, H5S_ALL, H5P_DEFAULT, c.data_ptr()), "cannot write dataset '", name,
          "' in '", path_, "'", space_note(path_));
  written_[name] = crc_of(c);
}

void H5File::put(const std::string& name, const at::Tensor& data) {
  create_dataset(name, data.scalar_type(), data.sizes().vec());
  write(name, data);
}

bool H5File::exists(const std::string& name) const {
  std::size_t pos = 0;
  while ((pos = name.find('/', pos + 1)) != std::string::npos)
    if (H5Lexists(file_, name.substr(0, pos).c_str(), H5P_DEFAULT) <= 0) return false;
  return H5Lexists(file_, name.c_str(), H5P_DEFAULT) > 0;
}

std::vector<std::int64_t> H5File::shape(const std::string& name) const {
  Handle d{open_dataset(name), H5Dclose};
  Handle space{H5Dget_space(d.id), H5Sclose};
  const int rank = H5Sget_simple_extent_ndims(space.id);
  std::vector<hsize_t> dims(static_cast<std::size_t>(std::max(rank, 0)));
  H5Sget_simple_extent_dims(space.id, dims.data(), nullptr);
  return {dims.begin(), dims.end()};
}

at::Tensor H5File::read(const std::string& name) const {
  Handle d{open_dataset(name), H5Dclose};
  Handle ftype{H5Dget_type(d.id), H5Tclose};
  const at::ScalarType st = scalar_of(ftype.id);
  CSAQ_CHECK(st != at::ScalarType::Undefined, "dataset '", name, "' in '", path_, "' has an unsupported element type");
  at::Tensor out = at::empty(shape(name), at::TensorOptions().dtype(st));
  if (out.numel() == 0) return out;
  Handle t{make_type(st), H5Tclose};
  CSAQ_H5(H5Dread(d.id, t.id, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data_ptr()), "cannot read dataset '", name,
          "' in '", path_, "'");
  if (name != kChecksums) verify(name, out);
  return out;
}

void H5File::verify(const std::string& name, const at::Tensor& data) const {
  if (!expected_loaded_) {
    expected_loaded_ = true;
    if (exists(kChecksums)) {
      try {
        const nlohmann::json sums = nlohmann::json::parse(read_text(kChecksums));
        for (const auto& [k, v] : sums.items()) expected_[k] = v.get<std::uint32_t>();
      } catch (const nlohmann::json::exception& e) {
        CSAQ_FAIL("'", kChecksums, "' in '", path_, "' is damaged: ", e.what());
      }
    }
  }
  const auto it = expected_.find(name);
  if (it == expected_.end()) return;  // written before checksums were kept, or not written whole
  CSAQ_CHECK(crc_of(data) == it->second, "dataset '", name, "' in '", path_,
             "' is corrupted: its bytes no longer match the checksum recorded when it was written");
}

std::vector<std::string> H5File::list(const std::string& group) const {
  const std::string g = group.empty() ? "/" : group;
  CSAQ_CHECK(group.empty() || exists(group), "HDF5 file '", path_, "' has no group '", group, "'");
  // Index-based listing: the same calls in HDF5 1.10 and later.
  H5G_info_t info{};
  CSAQ_H5(H5Gget_info_by_name(file_, g.c_str(), &info, H5P_DEFAULT), "cannot list '", g, "' in '", path_, "'");
  std::vector<std::string> names;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    const ssize_t len = H5Lget_name_by_idx(file_, g.c_str(), H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    std::string name(static_cast<std::size_t>(std::max<ssize_t>(len, 0)) + 1, '\0');
    H5Lget_name_by_idx(file_, g.c_str(), H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT);
    name.resize(static_cast<std::size_t>(std::max<ssize_t>(len, 0)));
    names.push_back(name);
  }
  return names;
}

void H5File::put_text(const std::string& name, const std::string& text, bool write_it) {
  create_dataset(name, at::kByte, {static_cast<std::int64_t>(text.size())});
  if (!write_it) return;
  at::Tensor bytes = at::empty({static_cast<std::int64_t>(text.size())}, at::kByte);
  std::copy(text.begin(), text.end(), reinterpret_cast<char*>(bytes.data_ptr()));
  write(name, bytes);
}

std::string H5File::read_text(const std::string& name) const {
  const at::Tensor bytes = read(name);
  CSAQ_CHECK(bytes.scalar_type() == at::kByte && bytes.dim() == 1, "dataset '", name, "' in '", path_, "' is not text");
  const char* p = reinterpret_cast<const char*>(bytes.data_ptr());
  return std::string(p, p + bytes.numel());
}

}  // namespace csaq::storage
