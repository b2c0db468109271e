#include "csaq/storage/files.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <optional>
#include <random>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "csaq/storage/error.h"

namespace csaq::storage {
namespace fs = std::filesystem;

namespace {
void fsync_dir_of(const std::string& path) {
  fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) dir = ".";
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;  // Some filesystems refuse to open directories; the rename stands.
  ::fsync(fd);
  ::close(fd);
}

// What a non-regular file is, for messages.
const char* kind_of(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISLNK(mode)) return "a symbolic link";
  return "not a regular file";
}
}  // namespace

void check_writable_target(const std::string& path, bool overwrite) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    CSAQ_CHECK(errno == ENOENT, "cannot check output '", path, "': ", errno_str(errno));
    return;
  }
  CSAQ_CHECK(S_ISREG(st.st_mode), "output '", path, "' is ", kind_of(st.st_mode),
             "; csaq writes regular files only and replaces nothing else");
  CSAQ_CHECK(overwrite, "output '", path, "' already exists; pass --overwrite to replace it");
}

void require_regular_file(const std::string& path, const std::string& what) {
  struct stat st {};
  CSAQ_CHECK(::stat(path.c_str(), &st) == 0, "cannot open ", what, " '", path, "': ", errno_str(errno));
  CSAQ_CHECK(S_ISREG(st.st_mode), what, " '", path, "' is ", kind_of(st.st_mode), ", not a regular file");
}

std::string unique_sibling(const std::string& path, const std::string& tag) {
  static std::random_device device;
  char suffix[32];
  std::snprintf(suffix, sizeof(suffix), "%ld-%08x", static_cast<long>(::getpid()), static_cast<unsigned>(device()));
  return path + "." + tag + "." + suffix;
}

namespace {
struct FileId {
  dev_t dev;
  ino_t ino;
};
std::optional<FileId> file_id(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return FileId{st.st_dev, st.st_ino};
}
bool same_file(const std::string& a, const std::string& b) {
  const auto ia = file_id(a), ib = file_id(b);
  if (ia && ib) return ia->dev == ib->dev && ia->ino == ib->ino;
  std::error_code e1, e2;
  return fs::weakly_canonical(a, e1) == fs::weakly_canonical(b, e2);
}
}  // namespace

void check_outputs(const std::vector<NamedPath>& outputs, const std::vector<NamedPath>& inputs, bool overwrite) {
  for (std::size_t k = 0; k < outputs.size(); ++k) {
    const NamedPath& out = outputs[k];
    if (out.path.empty()) continue;
    // Input files first, then the files of input directories: the most direct name is given.
    for (const bool directories : {false, true}) {
      for (const NamedPath& in : inputs) {
        std::error_code ec;
        if (in.path.empty() || fs::is_directory(in.path, ec) != directories) continue;
        if (!directories) {
          CSAQ_CHECK(!same_file(out.path, in.path), out.option, " '", out.path, "' is the input ", in.option, " '",
                     in.path, "'; choose another output path");
          continue;
        }
        for (const auto& e : fs::directory_iterator(in.path, ec))
          CSAQ_CHECK(!same_file(out.path, e.path().string()), out.option, " '", out.path, "' is the file '",
                     e.path().string(), "' of the input ", in.option, " '", in.path, "'; choose another output path");
      }
    }
    for (std::size_t j = 0; j < k; ++j)
      CSAQ_CHECK(outputs[j].path.empty() || !same_file(out.path, outputs[j].path), out.option, " and ",
                 outputs[j].option, " name the same file '", out.path, "'; give each output its own path");
    fs::path dir = fs::path(out.path).parent_path();
    if (dir.empty()) dir = ".";
    std::error_code ec;
    CSAQ_CHECK(fs::is_directory(dir, ec), "the directory of ", out.option, " '", out.path, "' does not exist");
    check_writable_target(out.path, overwrite);
  }
}

AtomicFile::AtomicFile(std::string path, bool overwrite)
    : path_(std::move(path)), overwrite_(overwrite) {
  check_writable_target(path_, overwrite_);
  tmp_path_ = unique_sibling(path_, "tmp");
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  CSAQ_CHECK(fd_ >= 0, "cannot create '", tmp_path_, "': ", errno_str(errno));
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_path_.c_str());
  }
}

void AtomicFile::write(const void* data, std::size_t size) {
  CSAQ_CHECK(fd_ >= 0, "write to '", path_, "' after commit");
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd_, p, size);
    if (n < 0 && errno == EINTR) continue;
    CSAQ_CHECK(n > 0, "cannot write '", tmp_path_, "': ", errno_str(errno));
    p += n;
    size -= static_cast<std::size_t>(n);
  }
}

void AtomicFile::commit() {
  CSAQ_CHECK(fd_ >= 0, "'", path_, "' committed twice");
  CSAQ_CHECK(::fsync(fd_) == 0, "cannot sync '", tmp_path_, "': ", errno_str(errno));
  int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) {
    int err = errno;
    ::unlink(tmp_path_.c_str());
    CSAQ_FAIL("cannot close '", tmp_path_, "': ", errno_str(err));
  }
  try {
    // Without overwrite, a target that appeared while this file was written is kept.
    durable_rename(tmp_path_, path_, overwrite_, /*sync=*/false);  // synced through fd_ above
  } catch (const Error&) {
    ::unlink(tmp_path_.c_str());
    throw;
  }
}

void durable_rename(const std::string& from, const std::string& to, bool replace, bool sync) {
  if (sync) {
    const int fd = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
    CSAQ_CHECK(fd >= 0, "cannot open '", from, "' to sync it: ", errno_str(errno));
    const int rc = ::fsync(fd);
    const int err = errno;
    ::close(fd);
    CSAQ_CHECK(rc == 0, "cannot sync '", from, "': ", errno_str(err));
  }
  if (replace) {
    check_writable_target(to, /*overwrite=*/true);  // only a regular file is replaced
    CSAQ_CHECK(::rename(from.c_str(), to.c_str()) == 0, "cannot rename '", from, "' to '", to, "': ", errno_str(errno));
  } else if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) != 0) {
    int err = errno;
    if (err == EINVAL || err == ENOSYS) {  // a filesystem without it: link() also never replaces
      err = ::link(from.c_str(), to.c_str()) == 0 ? 0 : errno;
      if (err == 0) ::unlink(from.c_str());
    }
    CSAQ_CHECK(err != EEXIST, "output '", to, "' appeared while csaq was writing it; kept it (pass --overwrite to replace it)");
    CSAQ_CHECK(err == 0, "cannot rename '", from, "' to '", to, "': ", errno_str(err));
  }
  fsync_dir_of(to);
}

void write_file_atomic(const std::string& path, const std::string& text, bool overwrite) {
  AtomicFile file(path, overwrite);
  file.write(text);
  file.commit();
}

std::string read_text_file(const std::string& path) {
  require_regular_file(path, "file");
  std::ifstream in(path, std::ios::binary);
  CSAQ_CHECK(in, "cannot open '", path, "': ", errno_str(errno));
  std::ostringstream out;
  out << in.rdbuf();
  CSAQ_CHECK(!in.bad(), "cannot read '", path, "'");
  return out.str();
}

MappedFile::MappedFile(const std::string& path) : path_(path) {
  require_regular_file(path, "file");
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  CSAQ_CHECK(fd >= 0, "cannot open '", path, "': ", errno_str(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    CSAQ_FAIL("cannot stat '", path, "': ", errno_str(err));
  }
  size_ = static_cast<std::size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    int err = errno;
    ::close(fd);
    CSAQ_CHECK(p != MAP_FAILED, "cannot map '", path, "': ", errno_str(err));
    data_ = static_cast<const std::uint8_t*>(p);
  } else {
    ::close(fd);
  }
}

std::uint32_t crc32_of(const void* data, std::size_t size) {
  const auto* p = static_cast<const Bytef*>(data);
  uLong crc = crc32(0L, Z_NULL, 0);
  while (size > 0) {  // zlib takes a uInt length
    const auto n = static_cast<uInt>(std::min<std::size_t>(size, std::size_t{1} << 30));
    crc = crc32(crc, p, n);
    p += n;
    size -= n;
  }
  return static_cast<std::uint32_t>(crc);
}

std::uint32_t file_crc32(const std::string& path) {
  const MappedFile m(path);
  return crc32_of(m.data(), m.size());
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<std::uint8_t*>(data_), size_);
}

}  // namespace csaq::storage
