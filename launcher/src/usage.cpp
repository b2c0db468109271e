#include "usage.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <malloc.h>

#include <array>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "csaq/shard/phases.h"

namespace csaq::cli {
namespace {
std::int64_t g_baseline_rss = 0;
std::vector<std::pair<std::string, std::int64_t>> g_stage_peaks;

// Every phase a run can report, in report order.
constexpr std::array<const char*, 11> kPhases{"forward", "backward", "recompute", "salience_fold", "output_gradient_energy",
                                              "coactivation", "hessian", "input_statistics", "communication",
                                              "early_stop", "checkpoint"};

// Each rank's `values` as rows of a [world, n] tensor (every rank gets all rows).
at::Tensor gather_rows(Communicator& comm, const std::vector<double>& values) {
  return comm.all_gather(at::tensor(values, at::kDouble));
}
}  // namespace

void record_start_of_run() { g_baseline_rss = resident_bytes(); }

void end_stage(const char* stage) {
  g_stage_peaks.emplace_back(stage, peak_resident_bytes());
  malloc_trim(0);
}

std::string blas_description() {
  void* sgemm = dlsym(RTLD_DEFAULT, "sgemm_");
  Dl_info info{};
  if (sgemm == nullptr || dladdr(sgemm, &info) == 0 || info.dli_fname == nullptr) return "BLAS linked into LibTorch";
  std::error_code ec;
  const std::string file = std::filesystem::canonical(info.dli_fname, ec).string();
  using ConfigFn = char* (*)();
  if (auto config = reinterpret_cast<ConfigFn>(dlsym(RTLD_DEFAULT, "openblas_get_config"))) {
    // The configuration names the build's default target; the kernels in use are the core's.
    auto corename = reinterpret_cast<ConfigFn>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
    return std::string(config()) + (corename ? std::string(", kernels: ") + corename() : std::string()) + " (" +
           (ec ? info.dli_fname : file) + ")";
  }
  return ec ? info.dli_fname : file;
}

nlohmann::json runtime_json() {
  return {{"blas", blas_description()}, {"threads", at::get_num_threads()}, {"device", "cpu"}};
}

nlohmann::json memory_json(Communicator& comm) {
  const double peak = static_cast<double>(peak_resident_bytes()), base = static_cast<double>(g_baseline_rss);
  std::vector<double> values{base, peak};
  for (const auto& [stage, bytes] : g_stage_peaks) values.push_back(static_cast<double>(bytes));
  const at::Tensor all = gather_rows(comm, values);
  auto at_rank = [&](std::int64_t r, std::size_t i) { return static_cast<std::int64_t>(all[r][static_cast<std::int64_t>(i)].item<double>()); };
  nlohmann::json baseline = nlohmann::json::array(), peaks = nlohmann::json::array(), over = nlohmann::json::array();
  nlohmann::json after = nlohmann::json::object();
  for (std::int64_t r = 0; r < comm.size(); ++r) {
    baseline.push_back(at_rank(r, 0));
    peaks.push_back(at_rank(r, 1));
    over.push_back(at_rank(r, 1) - at_rank(r, 0));
    for (std::size_t i = 0; i < g_stage_peaks.size(); ++i) after[g_stage_peaks[i].first].push_back(at_rank(r, 2 + i) - at_rank(r, 0));
  }
  return {{"baseline_rss_bytes", baseline}, {"peak_rss_bytes", peaks}, {"peak_over_baseline_bytes", over},
          {"peak_over_baseline_after", after}};
}

nlohmann::json phases_json(Communicator& comm, double total_s) {
  const std::map<std::string, double> mine = phase_seconds();
  std::vector<double> values;
  for (const char* p : kPhases) values.push_back(mine.count(p) ? mine.at(p) : 0.0);
  values.push_back(total_s);
  const at::Tensor all = gather_rows(comm, values);
  nlohmann::json ranks = nlohmann::json::array();
  for (std::int64_t r = 0; r < comm.size(); ++r) {
    nlohmann::json row = nlohmann::json::object();
    double inside = 0;
    for (std::size_t i = 0; i < kPhases.size(); ++i) {
      const double s = all[r][static_cast<std::int64_t>(i)].item<double>();
      row[kPhases[i]] = s;
      inside += s;
    }
    const double total = all[r][static_cast<std::int64_t>(kPhases.size())].item<double>();
    row["other"] = std::max(0.0, total - inside);
    row["total"] = total;
    ranks.push_back(row);
  }
  return ranks;
}

}  // namespace csaq::cli
