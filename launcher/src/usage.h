// What a run used: the BLAS and threads it computed with, the time per phase and the peak
// resident memory of every rank, for the reports and `csaq --version`.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "csaq/shard/comm.h"

namespace csaq::cli {

// Called by main before any command: the resident memory a run's peak is measured over.
void record_start_of_run();

// The BLAS library that serves LibTorch's CPU matrix products: its file and, for OpenBLAS, its
// build configuration (or "BLAS linked into LibTorch" where no separate library is loaded).
std::string blas_description();
// {"blas", "threads" (intra-op threads per rank), "device"}.
nlohmann::json runtime_json();

// At the end of stage `stage` (every rank ends the same stages in the same order): notes the
// peak resident memory so far, so that a report says which stage set the peak, and hands the
// memory the stage freed back to the system (malloc_trim), so that the next stage's peak is its
// own tensors' and not the allocator's leftovers (docs/planning.md).
void end_stage(const char* stage);

// Collective. Per rank: resident memory at the start of the run, its peak, the peak over the
// start, and the peak over the start at the end of each recorded stage:
// {"baseline_rss_bytes": [...], "peak_rss_bytes": [...], "peak_over_baseline_bytes": [...],
//  "peak_over_baseline_after": {"<stage>": [...], ...}}.
nlohmann::json memory_json(Communicator& comm);
// Collective. Seconds per phase (see csaq/shard/phases.h) since the last reset_phases(), one
// object per rank, with "total" (the wall-clock time since that reset) and "other" (outside any
// phase).
nlohmann::json phases_json(Communicator& comm, double total_s);

}  // namespace csaq::cli
