// Where the time and memory of a run go: exclusive wall-clock seconds per named phase, and
// the process's resident memory.
//
// A ScopedPhase charges the time until it ends to its phase; a phase opened inside another
// pauses the outer one, so the phases never count a second twice and their sum is the time
// spent inside any phase. For the thread that runs the pipeline (LibTorch's intra-op threads
// only do work that the calling thread waits for, so their time is the caller's).
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace csaq {

class ScopedPhase {
 public:
  explicit ScopedPhase(const char* phase);
  ~ScopedPhase();
  ScopedPhase(const ScopedPhase&) = delete;
  ScopedPhase& operator=(const ScopedPhase&) = delete;

 private:
  const char* outer_;  // the phase this one pauses, resumed when it ends
};

// Seconds per phase since the start of the process (or the last reset) on this thread.
std::map<std::string, double> phase_seconds();
void reset_phases();

// Resident set size of this process now, and its peak so far (Linux /proc; 0 elsewhere).
std::int64_t resident_bytes();
std::int64_t peak_resident_bytes();
// Memory this process could still get: MemAvailable of /proc/meminfo, or less where the
// process's cgroup (v1 or v2: a SLURM job's --mem) leaves less; 0 when unknown. The
// environment variable CSAQ_TEST_MEM_AVAILABLE (bytes) replaces it, for tests.
std::int64_t available_memory_bytes();

}  // namespace csaq
