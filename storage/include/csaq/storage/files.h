// Files written whole or not at all, and read-only memory maps.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

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
// false because the caller already did), renames it to `to`, fsyncs the directory. Errors
// name both paths.
void durable_rename(const std::string& from, const std::string& to, bool sync = true);

// Writes `text` to `path` through an AtomicFile.
void write_file_atomic(const std::string& path, const std::string& text, bool overwrite);

// Refuses (csaq::Error naming the path) when `path` exists and `overwrite` is not set.
void check_writable_target(const std::string& path, bool overwrite);

// Reads a whole small file (config, index, report) into a string; errors name the path.
std::string read_text_file(const std::string& path);

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
