// Files written whole or not at all, and read-only memory maps.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace csaq::storage {

// Writes a file under a temporary name beside the target and renames it into place on
// commit(), after an fsync of the file and its directory. Until commit() the target is
// untouched; destroying an uncommitted writer removes the temporary file. An existing
// target is an error unless `overwrite` is set. Not thread-safe. Every failure throws
// csaq::Error naming the path.
class AtomicFile {
 public:
  AtomicFile(std::string path, bool overwrite);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, std::size_t size);
  void write(const std::string& text) { write(text.data(), text.size()); }
  void commit();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::string tmp_path_;
  int fd_ = -1;
  bool overwrite_;
};

// Puts a finished file in place so that it survives a crash: fsyncs `from` (unless `sync` is
// false because the caller already did), renames it to `to`, fsyncs the directory. Without
// `replace` the rename is atomic only-if-absent: a file that appeared at `to` meanwhile is
// kept and the call fails; with it, only a regular file is ever replaced. Errors name both
// paths.
void durable_rename(const std::string& from, const std::string& to, bool replace, bool sync = true);

// A name beside `path` that no other run uses: `path`.<tag>.<pid>-<random>.
std::string unique_sibling(const std::string& path, const std::string& tag);

// Writes `text` to `path` through an AtomicFile.
void write_file_atomic(const std::string& path, const std::string& text, bool overwrite);

// Refuses (csaq::Error naming the path) when `path` exists and `overwrite` is not set, and
// always when it exists but is not a regular file (a device, FIFO, directory, ...).
void check_writable_target(const std::string& path, bool overwrite);

// A path named on the command line, with the option that named it (for messages).
struct NamedPath {
  std::string option;
  std::string path;
};

// Checks a command's outputs before any work, against its inputs and each other. Refuses,
// naming the options and paths: an output that is an input, or a file of an input directory
// (the same file: the same device and inode, or for an output not there yet the same path);
// an output named twice; an output whose directory does not exist; and, through
// check_writable_target, one that exists without `overwrite` or is not a regular file. Empty
// paths are skipped.
void check_outputs(const std::vector<NamedPath>& outputs, const std::vector<NamedPath>& inputs, bool overwrite);

// Refuses (naming `what` and the path) a path that is missing or not a regular file, before
// anything opens it (a FIFO would block, a directory maps as "No such device").
void require_regular_file(const std::string& path, const std::string& what);

// Reads a whole small file (config, index, report) into a string; errors name the path.
std::string read_text_file(const std::string& path);

// CRC-32 (zlib's) of `size` bytes, of any size.
std::uint32_t crc32_of(const void* data, std::size_t size);

// CRC-32 of a whole file's bytes (memory-mapped; errors name the path).
std::uint32_t file_crc32(const std::string& path);

// A read-only memory map of a whole file. Thread-safe to read; shared by the tensors
// that view it (see SafetensorsFile).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace csaq::storage
