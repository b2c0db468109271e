#include "csaq/storage/files.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
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
}  // namespace

void check_writable_target(const std::string& path, bool overwrite) {
  std::error_code ec;
  CSAQ_CHECK(overwrite || !fs::exists(path, ec), "output '", path,
             "' already exists; pass --overwrite to replace it");
}

AtomicFile::AtomicFile(std::string path, bool overwrite)
    : path_(std::move(path)), overwrite_(overwrite) {
  check_writable_target(path_, overwrite_);
  tmp_path_ = path_ + ".tmp." + std::to_string(::getpid());
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
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
  // Checked again: the target may have appeared while this file was being written.
  std::error_code ec;
  if (!overwrite_ && fs::exists(path_, ec)) {
    ::unlink(tmp_path_.c_str());
    CSAQ_FAIL("output '", path_, "' already exists; pass --overwrite to replace it");
  }
  try {
    durable_rename(tmp_path_, path_, /*sync=*/false);  // synced through fd_ above
  } catch (const Error&) {
    ::unlink(tmp_path_.c_str());
    throw;
  }
}

void durable_rename(const std::string& from, const std::string& to, bool sync) {
  if (sync) {
    const int fd = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
    CSAQ_CHECK(fd >= 0, "cannot open '", from, "' to sync it: ", errno_str(errno));
    const int rc = ::fsync(fd);
    const int err = errno;
    ::close(fd);
    CSAQ_CHECK(rc == 0, "cannot sync '", from, "': ", errno_str(err));
  }
  CSAQ_CHECK(::rename(from.c_str(), to.c_str()) == 0, "cannot rename '", from, "' to '", to, "': ", errno_str(errno));
  fsync_dir_of(to);
}

void write_file_atomic(const std::string& path, const std::string& text, bool overwrite) {
  AtomicFile file(path, overwrite);
  file.write(text);
  file.commit();
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  CSAQ_CHECK(in, "cannot open '", path, "': ", errno_str(errno));
  std::ostringstream out;
  out << in.rdbuf();
  CSAQ_CHECK(!in.bad(), "cannot read '", path, "'");
  return out.str();
}

MappedFile::MappedFile(const std::string& path) : path_(path) {
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

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<std::uint8_t*>(data_), size_);
}

}  // namespace csaq::storage
