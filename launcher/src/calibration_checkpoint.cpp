#include "calibration_checkpoint.h"

#include <ATen/ATen.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <thread>
#include <chrono>
#include <vector>

#include "csaq/packer/checkpoint.h"
#include "csaq/shard/phases.h"
#include "csaq/storage/error.h"
#include "csaq/storage/files.h"
#include "csaq/storage/h5.h"

namespace csaq::cli {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

volatile std::sig_atomic_t g_preempt = 0;
extern "C" void on_preempt_signal(int) { g_preempt = 1; }

// 2: input Hessians, gradient sums, output-gradient energies; 3: backward passes in forward
// order (any --in-flight), only the accumulators the cost model uses
constexpr std::int64_t kCalibrationFormat = 3;

// FNV-1a, 64-bit: a fingerprint, not a security measure.
std::uint64_t fnv1a(const void* data, std::size_t size, std::uint64_t h = 1469598103934665603ULL) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < size; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  return h;
}

std::string hex(std::uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// "a.b.c" -> value, for listing what differs between two fingerprints.
void flatten(const json& j, const std::string& prefix, std::map<std::string, std::string>& out) {
  if (j.is_object()) {
    for (const auto& [k, v] : j.items()) flatten(v, prefix.empty() ? k : prefix + "." + k, out);
  } else {
    out[prefix] = j.dump();
  }
}

std::string checkpoint_name(std::int64_t micro_batches) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "calib-%010lld.h5", static_cast<long long>(micro_batches));
  return buf;
}

// Committed checkpoints (file + ".done" marker), newest last.
std::vector<std::pair<std::int64_t, std::string>> committed(const std::string& dir) {
  std::vector<std::pair<std::int64_t, std::string>> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    // Only names this run writes count: anything else a user leaves here is ignored.
    if (name.rfind("calib-", 0) != 0 || name.size() != 19 || name.substr(16) != ".h5" ||
        name.substr(6, 10).find_first_not_of("0123456789") != std::string::npos)
      continue;
    if (!fs::exists(e.path().string() + ".done", ec)) continue;  // never committed: ignored
    out.emplace_back(std::stoll(name.substr(6, 10)), e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

void install_preemption_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_preempt_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGUSR1, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

json calibration_fingerprint(const std::string& model_dir, const TokenSequences& data, const json& options,
                            Communicator& comm) {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(model_dir))
    if (e.path().extension() == ".safetensors") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  // Every byte of the weights, the files shared out between the ranks (rank r hashes files
  // r, r + W, ...), so the same files give the same fingerprint on any number of ranks.
  at::Tensor crc = at::zeros({static_cast<std::int64_t>(files.size())}, at::kLong);
  for (std::size_t i = static_cast<std::size_t>(comm.rank()); i < files.size(); i += static_cast<std::size_t>(comm.size()))
    crc[static_cast<std::int64_t>(i)] = static_cast<std::int64_t>(storage::file_crc32(files[i].string()));
  comm.all_reduce(crc, ReduceOp::kSum);
  json weights = json::array();
  for (std::size_t i = 0; i < files.size(); ++i)
    weights.push_back({{"file", files[i].filename().string()},
                       {"bytes", fs::file_size(files[i])},
                       {"crc32", hex(static_cast<std::uint64_t>(crc[static_cast<std::int64_t>(i)].item<std::int64_t>()))}});
  const std::string config = storage::read_text_file((fs::path(model_dir) / "config.json").string());
  const at::Tensor tokens = data.batch(0, data.size()).contiguous();
  return {{"format_version", kCalibrationFormat},
          {"model", {{"config.json", hex(fnv1a(config.data(), config.size()))}, {"weights", weights}}},
          {"calibration", {{"sequences", data.size()}, {"seq_len", data.seq_len()},
                           {"tokens", hex(fnv1a(tokens.data_ptr(), tokens.nbytes()))}}},
          {"options", options}};
}

// Removes what interrupted writes of checkpoints left here (`calib-<N>.h5.partial.<id>`): a run
// that crashed mid-write leaves one, and for a large model it is as large as a checkpoint.
void remove_interrupted_writes(const std::string& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("calib-", 0) == 0 && name.find(".h5.partial.") != std::string::npos && e.is_regular_file(ec))
      fs::remove(e.path(), ec);
  }
}

CalibrationCheckpointer::CalibrationCheckpointer(std::string dir, std::int64_t every, json fingerprint,
                                                 Communicator& comm, bool at_end)
    : dir_(std::move(dir)), every_(every), at_end_(at_end), fingerprint_(std::move(fingerprint)), comm_(comm) {
  if (comm_.rank() == 0) {
    std::error_code ec;
    fs::create_directories(dir_, ec);
    CSAQ_CHECK(!ec, "cannot create checkpoint directory '", dir_, "': ", ec.message());
    remove_interrupted_writes(dir_);
  }
  comm_.barrier();
}

ResumePoint CalibrationCheckpointer::resume(const std::string& mode, Profiler& profiler) {
  CSAQ_CHECK(mode == "auto" || mode == "never" || mode == "must", "--resume must be auto, never or must, not '", mode, "'");
  if (mode == "never") return {};
  const auto found = committed(dir_);
  CSAQ_CHECK(!found.empty() || mode == "auto", "--resume must: no committed checkpoint in '", dir_, "'");
  if (found.empty()) return {};
  const std::string path = found.back().second;
  const storage::H5File f = storage::H5File::open_read(path);
  const json state = json::parse(f.read_text("profile.json"));
  std::map<std::string, std::string> saved, mine;
  flatten(state["fingerprint"], "", saved);
  flatten(fingerprint_, "", mine);
  std::string diffs;
  for (const auto& [k, v] : mine)
    if (saved.count(k) == 0 || saved[k] != v)
      diffs += "\n  " + k + ": checkpoint " + (saved.count(k) ? saved[k] : std::string("(absent)")) + ", this run " + v;
  for (const auto& [k, v] : saved)
    if (mine.count(k) == 0) diffs += "\n  " + k + ": checkpoint " + v + ", this run (absent)";
  CSAQ_CHECK(diffs.empty(), "checkpoint '", path, "' does not match this run (pass --resume never to start over):",
             diffs);
  profiler.load(f);
  ResumePoint r;
  r.micro_batch = state["micro_batches_done"].get<std::int64_t>();
  r.totals.nll_sum = state["nll_sum"].get<double>();
  r.totals.predicted_tokens = state["predicted_tokens"].get<std::int64_t>();
  r.totals.sequences = state["sequences"].get<std::int64_t>();
  last_saved_ = done_ = r.micro_batch;
  totals_ = r.totals;
  if (comm_.rank() == 0)
    std::fprintf(stderr, "[resume] %s: %lld micro-batches done\n", path.c_str(), static_cast<long long>(r.micro_batch));
  return r;
}

void CalibrationCheckpointer::save(std::int64_t micro_batches, const LossTotals& totals, const Profiler& profiler) {
  ScopedPhase phase("checkpoint");
  // Totals live on the last rank.
  at::Tensor t = at::tensor({totals.nll_sum, double(totals.predicted_tokens), double(totals.sequences)}, at::kDouble);
  comm_.broadcast(t, comm_.size() - 1);
  const json state = {{"fingerprint", fingerprint_},
                      {"micro_batches_done", micro_batches},
                      {"nll_sum", t[0].item<double>()},
                      {"predicted_tokens", static_cast<std::int64_t>(t[1].item<double>())},
                      {"sequences", static_cast<std::int64_t>(t[2].item<double>())}};
  const std::string path = (fs::path(dir_) / checkpoint_name(micro_batches)).string();
  ++saves_;
  // Test hook: CSAQ_FAULT_CRASH_IN_CHECKPOINT=K kills rank 0 in the middle of the K-th write.
  const char* crash = std::getenv("CSAQ_FAULT_CRASH_IN_CHECKPOINT");
  write_shared_h5(path, /*overwrite=*/true, comm_, [&](storage::H5File& f) {
    profiler.save(f, comm_, state.dump());
    if (crash != nullptr && std::atoi(crash) == saves_ && comm_.rank() == 0) std::_Exit(9);
  });
  if (comm_.rank() == 0) {
    // The marker is written last: a checkpoint without it is ignored, so a crash at any point
    // leaves the previous committed checkpoint in charge. Older checkpoints go after it.
    storage::write_file_atomic(path + ".done", std::to_string(micro_batches) + "\n", /*overwrite=*/true);
    for (const auto& [mb, older] : committed(dir_)) {
      if (older == path) continue;
      std::error_code ec;
      fs::remove(older + ".done", ec);
      fs::remove(older, ec);
    }
  }
  comm_.barrier();
  last_saved_ = micro_batches;
}

RoundCallback CalibrationCheckpointer::round_callback(Profiler& profiler) {
  RoundCallback early_stop = profiler.round_callback();
  return [this, early_stop, &profiler](const RoundInfo& info) {
    // Test hooks: CSAQ_FAULT_SIGNAL_AT=K raises SIGUSR1 on rank 0 once K micro-batches are
    // done; CSAQ_TEST_ROUND_DELAY_MS slows every round down (to signal or kill a run mid-way).
    if (const char* delay = std::getenv("CSAQ_TEST_ROUND_DELAY_MS"))
      std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(delay)));
    const char* at = std::getenv("CSAQ_FAULT_SIGNAL_AT");
    if (at != nullptr && comm_.rank() == 0 && info.micro_batches_done >= std::atoll(at)) std::raise(SIGUSR1);
    const bool finished = early_stop(info) || info.micro_batches_done == info.micro_batches_total;
    done_ = info.micro_batches_done;
    totals_ = info.totals;
    // The end of calibration is checkpointed too, so that a run lost in the later stages
    // resumes with no calibration left to do.
    if (every_ > 0 && ((finished && at_end_) || done_ - last_saved_ >= every_)) save(done_, totals_, profiler);
    if (!finished) stop_if_preempted(profiler);
    return finished;
  };
}

void CalibrationCheckpointer::stop_if_preempted(const Profiler& profiler) {
  at::Tensor flag = at::tensor({static_cast<std::int64_t>(g_preempt)}, at::kLong);
  {
    ScopedPhase phase("communication");
    comm_.all_reduce(flag, ReduceOp::kMax);
  }
  if (flag.item<std::int64_t>() == 0) return;
  if (done_ != last_saved_) save(done_, totals_, profiler);  // else the newest committed one is here
  throw Preempted{(fs::path(dir_) / checkpoint_name(done_)).string()};
}

void CalibrationCheckpointer::remove_all() {
  if (comm_.rank() == 0) {
    for (const auto& [mb, path] : committed(dir_)) {
      std::error_code ec;
      fs::remove(path + ".done", ec);
      fs::remove(path, ec);
    }
    remove_interrupted_writes(dir_);
    std::error_code ec;
    fs::remove(dir_, ec);  // only when empty
  }
  comm_.barrier();
}

}  // namespace csaq::cli
