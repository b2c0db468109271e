// Helpers shared by the test binaries: the test-material folder, temporary directories,
// and relative errors.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

namespace csaq::test {

// CSAQ_SHARED_DIR (CMake cache variable) joined with `sub`; empty when that is absent.
inline std::string shared_path(const std::string& sub) {
  const std::filesystem::path p = std::filesystem::path(CSAQ_SHARED_DIR) / sub;
  return std::filesystem::exists(p) ? p.string() : std::string();
}

// A fresh directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "csaq-test-XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return (std::filesystem::path(path_) / name).string(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// ||a - b||_F / ||b||_F in double.
inline double rel_error(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ad = a.detach().to(at::kDouble), bd = b.detach().to(at::kDouble);
  return (ad - bd).norm().item<double>() / bd.norm().item<double>();
}

}  // namespace csaq::test

// Skips the current test, saying what is missing, when shared test material is absent.
#define CSAQ_REQUIRE_SHARED(var, sub)                                                         \
  const std::string var = ::csaq::test::shared_path(sub);                                      \
  if (var.empty())                                                                            \
  GTEST_SKIP() << "test material '" << sub << "' not found under CSAQ_SHARED_DIR="             \
               << CSAQ_SHARED_DIR << " (configure with -DCSAQ_SHARED_DIR=<path to shared>)"

// Expects `statement` to throw csaq::Error whose message contains every listed fragment.
#define EXPECT_CSAQ_ERROR(statement, ...)                                                  \
  do {                                                                                     \
    try {                                                                                  \
      statement;                                                                           \
      ADD_FAILURE() << "expected csaq::Error from " #statement;                            \
    } catch (const ::csaq::Error& e) {                                                     \
      for (const std::string& fragment : std::initializer_list<std::string>{__VA_ARGS__}) \
        EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos)                 \
            << "message '" << e.what() << "' lacks '" << fragment << "'";                  \
    }                                                                                      \
  } while (0)
