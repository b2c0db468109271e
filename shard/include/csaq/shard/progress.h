// Progress lines for long work: "[stage] 12/64 batches  3.1 batch/s  elapsed 3.9s  ETA 16.8s".
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <string>

namespace csaq {

// Told of units of work done out of a total (micro-batches, Linears).
using ProgressCallback = std::function<void(std::int64_t done, std::int64_t total)>;

// Prints at most one line per `interval_s` (and always the last), one line each so that
// batch-system log files stay readable. Disabled meters print nothing (ranks other than 0).
// A run that resumes passes the units already done before it started, so that its rate and
// ETA count only its own work.
class ProgressMeter {
 public:
  ProgressMeter(std::string stage, std::string unit, std::int64_t total, bool enabled,
                double interval_s = 1.0, std::int64_t already_done = 0);
  void update(std::int64_t done);
  // update() as a ProgressCallback.
  ProgressCallback callback() {
    return [this](std::int64_t done, std::int64_t) { update(done); };
  }
  double elapsed_s() const;

 private:
  std::string stage_;
  std::string unit_;
  std::int64_t total_;
  bool enabled_;
  std::int64_t already_done_;
  double interval_s_;
  std::chrono::steady_clock::time_point start_;
  double last_print_s_ = -1e9;
};

}  // namespace csaq
