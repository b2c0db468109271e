#include "csaq/shard/progress.h"

#include <cstdio>

namespace csaq {

ProgressMeter::ProgressMeter(std::string stage, std::string unit, std::int64_t total, bool enabled,
                             double interval_s, std::int64_t already_done)
    : stage_(std::move(stage)),
      unit_(std::move(unit)),
      total_(total),
      enabled_(enabled),
      already_done_(already_done),
      interval_s_(interval_s),
      start_(std::chrono::steady_clock::now()) {}

double ProgressMeter::elapsed_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void ProgressMeter::update(std::int64_t done) {
  if (!enabled_) return;
  const double t = elapsed_s();
  if (done < total_ && t - last_print_s_ < interval_s_) return;
  last_print_s_ = t;
  const double rate = t > 0 ? static_cast<double>(done - already_done_) / t : 0.0;
  const double eta = rate > 0 ? static_cast<double>(total_ - done) / rate : 0.0;
  std::fprintf(stderr, "[%s] %lld/%lld %s  %.2f %s/s  elapsed %.1fs  ETA %.1fs\n", stage_.c_str(),
               static_cast<long long>(done), static_cast<long long>(total_), unit_.c_str(), rate,
               unit_.c_str(), t, eta);
  std::fflush(stderr);
}

}  // namespace csaq
