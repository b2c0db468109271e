// Helpers for tests that run the csaq executable (single process and under mpirun).
#pragma once

#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "support.h"

namespace csaq {

using nlohmann::json;
using test::TempDir;

struct Result {
  int rc = -1;
  std::string output;  // stdout and stderr
};

// Runs a shell command with a time limit (so that a hang fails instead of blocking).
inline Result run(const std::string& command, int timeout_s = 120) {
  static const bool env_set = [] {
    // mpirun as root in containers, and more ranks than cores on small machines.
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 0);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 0);
    setenv("OMPI_MCA_rmaps_base_oversubscribe", "1", 0);
    return true;
  }();
  (void)env_set;
  Result r;
  const std::string full = "timeout " + std::to_string(timeout_s) + " " + command + " 2>&1";
  FILE* pipe = popen(full.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  std::size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) r.output.append(buf, n);
  const int status = pclose(pipe);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

inline std::string csaq() { return CSAQ_EXE; }
inline std::string mpirun(int ranks) { return std::string(CSAQ_MPIEXEC) + " -n " + std::to_string(ranks) + " " + CSAQ_EXE; }

// The number after the first line starting with `label` ("perplexity: ", "KL divergence: ");
// NaN when there is none, so that every comparison with it fails.
inline double printed_value(const Result& r, const std::string& label) {
  const std::string text = "\n" + r.output;
  const auto pos = text.find("\n" + label);
  return pos == std::string::npos ? std::nan("") : std::stod(text.substr(pos + 1 + label.size()));
}
inline double perplexity_of(const Result& r) { return printed_value(r, "perplexity: "); }

inline json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

// A small random model: 3 layers so that 1, 2 and 3 ranks all divide it differently.
inline void make_demo(const TempDir& dir) {
  Result r = run(csaq() + " make-demo --out " + (dir / "demo") +
                 " --layers 3 --hidden 64 --intermediate 160 --heads 4 --kv-heads 2 --vocab 260 --tokens 2048");
  ASSERT_EQ(r.rc, 0) << r.output;
}

}  // namespace csaq
