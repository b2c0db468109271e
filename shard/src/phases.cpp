#include "csaq/shard/phases.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>

namespace csaq {
namespace {
using Clock = std::chrono::steady_clock;

struct PhaseState {
  std::map<std::string, double> seconds;
  const char* current = nullptr;  // the innermost open phase
  Clock::time_point since;
};

thread_local PhaseState state;

// Charges the time since the last switch to the phase running now.
void charge(Clock::time_point now) {
  if (state.current != nullptr)
    state.seconds[state.current] += std::chrono::duration<double>(now - state.since).count();
  state.since = now;
}
}  // namespace

ScopedPhase::ScopedPhase(const char* phase) : outer_(state.current) {
  charge(Clock::now());
  state.current = phase;
}

ScopedPhase::~ScopedPhase() {
  charge(Clock::now());
  state.current = outer_;
}

std::map<std::string, double> phase_seconds() {
  charge(Clock::now());
  return state.seconds;
}

void reset_phases() {
  state.seconds.clear();
  state.since = Clock::now();
}

std::int64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::int64_t pages = 0, resident = 0;
  if (!(statm >> pages >> resident)) return 0;
  return resident * static_cast<std::int64_t>(::sysconf(_SC_PAGESIZE));
}

namespace {
// Bytes of the "key: N kB" line of a /proc file, or 0.
std::int64_t kb_field(const char* path, const std::string& key) {
  std::ifstream in(path);
  std::string k;
  while (in >> k) {
    std::int64_t kb = 0;
    if (k == key && in >> kb) return kb * 1024;
    in.ignore(1 << 20, '\n');
  }
  return 0;
}
// The number a cgroup file holds, or -1 ("max", no limit, reads as none).
std::int64_t number_in(const std::string& path) {
  std::ifstream in(path);
  std::int64_t v = -1;
  return in >> v ? v : -1;
}
}  // namespace

std::int64_t peak_resident_bytes() { return kb_field("/proc/self/status", "VmHWM:"); }

std::int64_t available_memory_bytes() {
  if (const char* test = std::getenv("CSAQ_TEST_MEM_AVAILABLE")) return std::atoll(test);
  std::int64_t free = kb_field("/proc/meminfo", "MemAvailable:");
  // The job's limit, cgroup v2 ("0::/path": memory.max) or v1 ("N:memory:/path").
  auto limit = [&](const std::string& max_file, const std::string& used_file) {
    const std::int64_t max = number_in(max_file), used = number_in(used_file);
    if (max > 0 && used >= 0 && (free == 0 || max - used < free)) free = std::max<std::int64_t>(0, max - used);
  };
  std::ifstream cgroup("/proc/self/cgroup");
  std::string line;
  while (std::getline(cgroup, line)) {
    const std::size_t at = line.find(":memory:");
    if (line.rfind("0::", 0) == 0)
      limit("/sys/fs/cgroup" + line.substr(3) + "/memory.max", "/sys/fs/cgroup" + line.substr(3) + "/memory.current");
    else if (at != std::string::npos)
      limit("/sys/fs/cgroup/memory" + line.substr(at + 8) + "/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory" + line.substr(at + 8) + "/memory.usage_in_bytes");
  }
  return free;
}

}  // namespace csaq
