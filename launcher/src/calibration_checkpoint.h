// Resumable calibration: HDF5 checkpoints of the profiler's state, preemption by signal,
// and --resume. See docs/cluster.md.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "csaq/profiler/profiler.h"
#include "csaq/shard/comm.h"
#include "csaq/shard/data.h"
#include "csaq/shard/pipeline.h"

namespace csaq::cli {

// Exit status after a checkpoint written because of SIGUSR1/SIGTERM (EX_TEMPFAIL): the job
// should be requeued and rerun with --resume auto.
inline constexpr int kPreemptedExitCode = 75;

// Thrown on every rank once a preemption checkpoint is committed.
struct Preempted {
  std::string checkpoint;
};

// From here on SIGUSR1 and SIGTERM only set a flag; ranks agree on it at the next round
// boundary (or stage boundary after calibration). Only commands that calibrate install it;
// the others keep the default action (terminate).
void install_preemption_handlers();

// What must match for a checkpoint to be resumed: format, model files, calibration tokens,
// options: hashes of config.json, of every byte of each safetensors file (CRC-32, the files
// shared out between the ranks) and of the token windows. Collective.
nlohmann::json calibration_fingerprint(const std::string& model_dir, const TokenSequences& data,
                                       const nlohmann::json& options, Communicator& comm);

class CalibrationCheckpointer {
 public:
  // Checkpoints go to `dir` (created on rank 0) every `every` micro-batches (0: only when
  // preempted), and at the end of calibration when `at_end` (work follows that a lost run
  // should not calibrate again for).
  CalibrationCheckpointer(std::string dir, std::int64_t every, nlohmann::json fingerprint, Communicator& comm,
                          bool at_end = true);

  // mode "never": start fresh; "auto": the newest committed checkpoint if there is one;
  // "must": that checkpoint or an error. Restores `profiler` and returns where to continue.
  // A fingerprint mismatch is an error listing every difference.
  ResumePoint resume(const std::string& mode, Profiler& profiler);
  // Chains the profiler's early stopping with periodic and preemption checkpoints; the round
  // that ends calibration is checkpointed as well (unless checkpoints are only on signal or
  // not at_end).
  RoundCallback round_callback(Profiler& profiler);
  // Collective, between stages: if a rank got SIGUSR1/SIGTERM, makes sure a checkpoint of
  // where calibration stands is committed and throws Preempted on every rank.
  void stop_if_preempted(const Profiler& profiler);
  // Removes this run's checkpoints (after the final output is written).
  void remove_all();

 private:
  void save(std::int64_t micro_batches, const LossTotals& totals, const Profiler& profiler);

  std::string dir_;
  std::int64_t every_;
  bool at_end_;
  nlohmann::json fingerprint_;
  Communicator& comm_;
  std::int64_t last_saved_ = 0;
  std::int64_t done_ = 0;  // micro-batches calibrated so far
  LossTotals totals_;      // and their totals (last rank)
  int saves_ = 0;
};

}  // namespace csaq::cli
