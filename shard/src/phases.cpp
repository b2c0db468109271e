#include "csaq/shard/phases.h"

#include <unistd.h>

#include <chrono>
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

std::int64_t peak_resident_bytes() {
  std::ifstream status("/proc/self/status");
  std::string key;
  while (status >> key) {
    if (key == "VmHWM:") {
      std::int64_t kb = 0;
      status >> kb;
      return kb * 1024;
    }
    status.ignore(1 << 20, '\n');
  }
  return 0;
}

}  // namespace csaq
