// Surviving the cluster: preemption, killed ranks, crashes and full disks during checkpoint
// writes, resuming on another world size. Every resumed run must give the byte-identical
// checkpoint and the same report (timings aside) as an uninterrupted one.
#include <csignal>
#include <filesystem>

#include "cli_support.h"
#include "csaq/packer/checkpoint.h"
#include "csaq/storage/h5.h"
#include "csaq/storage/safetensors.h"
#include "h5_compare.h"

namespace csaq {
namespace {
namespace fs = std::filesystem;

class Resume : public ::testing::Test {
 protected:
  void SetUp() override {
    make_demo(dir);
    if (HasFatalFailure()) return;
    Result r = run(mpirun(2) + quantize("ref.h5"));
    ASSERT_EQ(r.rc, 0) << r.output;
  }

  // 24 calibration sequences in rounds of 2, a checkpoint every `every` (2) micro-batches,
  // no early stop unless `rho` says so; one thread per rank, so that runs on different world
  // sizes compare the same arithmetic (the BLAS may round differently with other thread counts).
  std::string quantize(const std::string& out, const std::string& extra = "", int every = 2,
                       const std::string& rho = "0.9999") const {
    return " quantize --model " + (dir / "demo") + " --calib " + (dir / "demo/calib.txt") +
           " --samples 24 --seq-len 64 --in-flight 2 --checkpoint-every " + std::to_string(every) +
           " --early-stop-rho " + rho + " --target-bits 5"
           " --bit-options 2,4,8 --group-options 32 --clique-threshold 0.5 --threads 1 --out " + (dir / out) + " --report " +
           (dir / (out + ".json")) + extra;
  }

  // `out` equals the uninterrupted ref.h5: every dataset, and the report without timings.
  void expect_same_as_reference(const std::string& out, bool same_world = true) const {
    ASSERT_TRUE(fs::exists(dir / out)) << out;
    const storage::H5File a = storage::H5File::open_read(dir / "ref.h5"), b = storage::H5File::open_read(dir / out);
    int compared = 0;
    test::expect_same_datasets(a, b, "", compared, {"report.json", "checksums.json"});
    EXPECT_GT(compared, 3 * 7 * 7);
    auto strip = [&](json j) {  // what was measured, not computed
      for (const char* key : {"time_s", "memory", "runtime"}) j.erase(key);
      if (!same_world)  // what depends on how the layers are spread over the ranks
        for (const char* key : {"world_size", "layer_partition", "planned_peak_bytes", "work"}) j.erase(key);
      return j;
    };
    EXPECT_EQ(strip(json::parse(a.read_text("report.json"))), strip(json::parse(b.read_text("report.json"))));
    EXPECT_EQ(strip(read_json(dir / "ref.h5.json")), strip(read_json(dir / (out + ".json"))));
    EXPECT_FALSE(fs::exists(dir / (out + ".calib"))) << "checkpoints are removed after success";
    EXPECT_EQ(read_json(dir / "ref.h5.json")["early_stop"]["checks"].size(), 2u) << "checks at 16 and 24";
  }

  std::vector<std::string> committed(const std::string& out) const {
    std::vector<std::string> names;
    if (!fs::exists(dir / (out + ".calib"))) return names;
    for (const auto& e : fs::directory_iterator(dir / (out + ".calib")))
      if (e.path().extension() == ".done") names.push_back(e.path().stem().string());
    return names;
  }

  TempDir dir;
};

TEST_F(Resume, PreemptionWritesACheckpointExitsWith75AndResumesOnAnotherWorldSize) {
  // Preempted at 10 sequences: between the early-stop samples at 8 and 16, so the resumed run
  // must carry the sample of 8 over to compare at 16.
  Result r = run("env CSAQ_FAULT_SIGNAL_AT=10 " + mpirun(2) + quantize("out.h5"));
  EXPECT_EQ(r.rc, 75) << r.output;
  EXPECT_NE(r.output.find("preempted: calibration checkpoint"), std::string::npos) << r.output;
  EXPECT_EQ(committed("out.h5"), std::vector<std::string>{"calib-0000000010.h5"});
  EXPECT_FALSE(fs::exists(dir / "out.h5"));
  r = run(mpirun(3) + quantize("out.h5"));  // resharded: 3 ranks continue 2 ranks' state
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("[resume]"), std::string::npos) << r.output;
  expect_same_as_reference("out.h5", /*same_world=*/false);
}

TEST_F(Resume, PreemptionAsCalibrationEndsStopsBeforeSolvingAndLeavesNothingToRecalibrate) {
  // Early stopping ends calibration at 16 sequences, in the round where the signal comes: the
  // run stops before solving, with the end of calibration committed (by the final checkpoint
  // when checkpoints are periodic, by the preemption itself when they are only on signal).
  Result r = run(mpirun(2) + quantize("es-ref.h5", "", 10, "0.5"));
  ASSERT_EQ(r.rc, 0) << r.output;
  ASSERT_EQ(read_json(dir / "es-ref.h5.json")["early_stop"]["sequences_used"], 16);
  for (int every : {10, 0}) {
    SCOPED_TRACE("--checkpoint-every " + std::to_string(every));
    const std::string out = "out" + std::to_string(every) + ".h5";
    r = run("env CSAQ_FAULT_SIGNAL_AT=16 " + mpirun(2) + quantize(out, "", every, "0.5"));
    EXPECT_EQ(r.rc, 75) << r.output;
    EXPECT_EQ(r.output.find("[solve]"), std::string::npos) << r.output;
    EXPECT_EQ(committed(out), std::vector<std::string>{"calib-0000000016.h5"});
    r = run(mpirun(2) + quantize(out, "", every, "0.5"));
    ASSERT_EQ(r.rc, 0) << r.output;
    EXPECT_NE(r.output.find("calib-0000000016.h5: 16 micro-batches done"), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("[profile] 1"), std::string::npos) << "no calibration rounds\n" << r.output;
    const storage::H5File a = storage::H5File::open_read(dir / "es-ref.h5"), b = storage::H5File::open_read(dir / out);
    int compared = 0;
    test::expect_same_datasets(a, b, "", compared, {"report.json", "checksums.json"});
    auto strip = [](json j) {
      for (const char* key : {"time_s", "memory", "runtime"}) j.erase(key);
      return j;
    };
    EXPECT_EQ(strip(read_json(dir / "es-ref.h5.json")), strip(read_json(dir / (out + ".json"))));
  }
}

TEST_F(Resume, RealSigusr1ToMpirunStopsAtTheNextRoundAndResumes) {
  const std::string script = "CSAQ_TEST_ROUND_DELAY_MS=300 " + mpirun(2) + quantize("out.h5") + " > " +
                             (dir / "log") + " 2>&1 & pid=$!; for i in $(seq 300); do ls " + (dir / "out.h5.calib") +
                             "/*.done > /dev/null 2>&1 && break; sleep 0.1; done; kill -USR1 $pid; wait $pid";
  Result r = run("sh -c '" + script + "'");
  std::ifstream log(dir / "log");
  const std::string out((std::istreambuf_iterator<char>(log)), {});
  EXPECT_EQ(r.rc, 75) << out;
  ASSERT_FALSE(committed("out.h5").empty());
  r = run(mpirun(2) + quantize("out.h5"));
  ASSERT_EQ(r.rc, 0) << r.output;
  expect_same_as_reference("out.h5");
}

TEST_F(Resume, SigtermToMpirunCheckpointsWhenTheRanksAreGivenTimeToFinishTheRound) {
  // Open MPI 4.1's mpirun passes a SIGTERM on to the ranks odls_base_sigkill_timeout seconds
  // (T) later and SIGKILLs them T seconds after that (T = 1 by default, less than a round
  // here): the documented recipe sets T above a round plus a checkpoint write. The ranks then
  // checkpoint and exit 75; mpirun itself reports 1 after a SIGTERM.
  const std::string script = "OMPI_MCA_odls_base_sigkill_timeout=5 CSAQ_TEST_ROUND_DELAY_MS=1500 " + mpirun(2) +
                             quantize("out.h5") + " > " + (dir / "log") + " 2>&1 & pid=$!; for i in $(seq 300); do ls " +
                             (dir / "out.h5.calib") + "/*.done > /dev/null 2>&1 && break; sleep 0.1; done; sleep 0.5; "
                             "kill -TERM $pid; wait $pid";
  Result r = run("sh -c '" + script + "'", 120);
  const std::string out = [&] {
    std::ifstream log(dir / "log");
    return std::string((std::istreambuf_iterator<char>(log)), {});
  }();
  EXPECT_EQ(r.rc, 1) << out;
  EXPECT_NE(out.find("preempted: calibration checkpoint"), std::string::npos) << out;
  ASSERT_EQ(committed("out.h5").size(), 1u) << out;
  EXPECT_NE(committed("out.h5")[0], "calib-0000000002.h5") << "the signal's own checkpoint, after the first\n" << out;
  r = run(mpirun(2) + quantize("out.h5"));
  ASSERT_EQ(r.rc, 0) << r.output;
  expect_same_as_reference("out.h5");
}

TEST_F(Resume, StrayFilesInTheCheckpointDirectoryAreIgnored) {
  Result r = run("env CSAQ_FAULT_SIGNAL_AT=4 " + csaq() + quantize("out.h5"));
  ASSERT_EQ(r.rc, 75) << r.output;
  for (const char* name : {"notes.txt", "calib-latest0000.h5", "calib-latest0000.h5.done", "calib-00000000xx.h5.done",
                           "calib-0000000099.h5"})
    std::ofstream(dir / ("out.h5.calib/" + std::string(name))) << "not a checkpoint";
  r = run(mpirun(2) + quantize("out.h5"));
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("calib-0000000004.h5: 4 micro-batches done"), std::string::npos) << r.output;
  ASSERT_TRUE(fs::exists(dir / "out.h5"));
  const storage::H5File a = storage::H5File::open_read(dir / "ref.h5"), b = storage::H5File::open_read(dir / "out.h5");
  int compared = 0;
  test::expect_same_datasets(a, b, "", compared, {"report.json", "checksums.json"});
  EXPECT_GT(compared, 3 * 7 * 7);
}

TEST_F(Resume, AModelWhoseWeightsChangedIsRefusedOnResume) {
  Result r = run("env CSAQ_FAULT_SIGNAL_AT=4 " + csaq() + quantize("out.h5"));
  ASSERT_EQ(r.rc, 75) << r.output;
  // Same header, same size: one weight's bytes differ.
  std::vector<storage::NamedTensor> tensors;
  {
    auto reader = storage::SafetensorsReader::open(dir / "demo");
    for (const auto& name : reader.names()) {
      at::Tensor t = reader.load(name).clone();
      if (name == "model.layers.1.self_attn.v_proj.weight") t.view(-1)[3] += 0.5;
      tensors.emplace_back(name, t);
    }
  }
  storage::write_safetensors(dir / "demo/model.safetensors", tensors, {}, /*overwrite=*/true);
  r = run(csaq() + quantize("out.h5"));
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("does not match this run"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("model"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "out.h5"));
}

TEST_F(Resume, KillingOneRankEndsTheJobNamingItAndTheRunResumes) {
  fs::create_directories(dir / "pids");
  const std::string script = "CSAQ_TEST_PID_DIR=" + (dir / "pids") + " CSAQ_TEST_ROUND_DELAY_MS=300 " + mpirun(3) +
                             quantize("out.h5") + " > " + (dir / "log") + " 2>&1 & pid=$!; for i in $(seq 300); do ls " +
                             (dir / "out.h5.calib") + "/*.done > /dev/null 2>&1 && break; sleep 0.1; done; sleep 0.$((RANDOM % 9)); "
                             "kill -9 $(cat " + (dir / "pids/rank-1.pid") + "); wait $pid";
  const auto start = std::chrono::steady_clock::now();
  Result r = run("bash -c '" + script + "'", 90);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::ifstream log(dir / "log");
  const std::string out((std::istreambuf_iterator<char>(log)), {});
  EXPECT_NE(r.rc, 0) << out;
  EXPECT_NE(r.rc, 124) << "the other ranks hung\n" << out;
  EXPECT_LT(seconds, 60);
  EXPECT_NE(out.find("rank 1"), std::string::npos) << out;
  EXPECT_FALSE(committed("out.h5").empty());
  r = run(mpirun(2) + quantize("out.h5"));
  ASSERT_EQ(r.rc, 0) << r.output;
  expect_same_as_reference("out.h5");
}

TEST_F(Resume, ACrashWhileWritingACheckpointKeepsThePreviousOne) {
  Result r = run("env CSAQ_FAULT_CRASH_IN_CHECKPOINT=2 " + mpirun(2) + quantize("out.h5"));
  EXPECT_NE(r.rc, 0) << r.output;
  EXPECT_EQ(committed("out.h5"), std::vector<std::string>{"calib-0000000002.h5"});
  int interrupted = 0;  // the write in progress, under a name of its own
  for (const auto& e : fs::directory_iterator(dir / "out.h5.calib"))
    interrupted += e.path().filename().string().rfind("calib-0000000004.h5.partial.", 0) == 0;
  EXPECT_EQ(interrupted, 1);
  r = run(mpirun(2) + quantize("out.h5"));
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("calib-0000000002.h5: 2 micro-batches done"), std::string::npos) << r.output;
  expect_same_as_reference("out.h5");
}

TEST_F(Resume, AFullDiskOnAnyRankEndsEveryRankAndThePreviousCheckpointStays) {
  // One process writes 8 datasets per Linear (21 Linears), 8 per layer for its input Hessians
  // (3 layers) and 2 texts per checkpoint, 194 in all: the second one runs out of space
  // half-way. With 2 ranks only rank 1 (the second app context) runs out, also in its second
  // checkpoint, and rank 0 must not wait for it forever.
  const std::string args = quantize("out.h5");
  for (int ranks : {1, 2}) {
    SCOPED_TRACE(std::to_string(ranks) + " rank(s)");
    const std::string command = ranks == 1 ? "env CSAQ_FAULT_ENOSPC_AFTER=300 " + csaq() + args
                                           : std::string(CSAQ_MPIEXEC) + " -n 1 " + csaq() + args +
                                                 " : -n 1 env CSAQ_FAULT_ENOSPC_AFTER=80 " + csaq() + args;
    Result r = run(command, 60);
    EXPECT_NE(r.rc, 124) << "a rank hung\n" << r.output;
    if (ranks == 1) {
      EXPECT_EQ(r.rc, 1) << "an error, not a crash\n" << r.output;
    }
    EXPECT_NE(r.rc, 0) << r.output;
    EXPECT_NE(r.output.find("error on rank " + std::to_string(ranks - 1) + " of " + std::to_string(ranks)),
              std::string::npos)
        << r.output;
    EXPECT_NE(r.output.find("No space left on device"), std::string::npos) << r.output;
    EXPECT_EQ(committed("out.h5"), std::vector<std::string>{"calib-0000000002.h5"});
    for (const auto& e : fs::directory_iterator(dir / "out.h5.calib"))
      EXPECT_EQ(e.path().string().find(".partial"), std::string::npos) << "left behind: " << e.path();
    EXPECT_FALSE(fs::exists(dir / "out.h5"));
    fs::remove_all(dir / "out.h5.calib");
  }
  Result r = run("env CSAQ_FAULT_ENOSPC_AFTER=300 " + csaq() + args);  // once more, then resume from it
  ASSERT_EQ(committed("out.h5"), std::vector<std::string>{"calib-0000000002.h5"}) << r.output;
  r = run(mpirun(2) + args);
  ASSERT_EQ(r.rc, 0) << r.output;
  expect_same_as_reference("out.h5");
}

TEST_F(Resume, AMismatchedCheckpointIsRefusedNamingWhatDiffers) {
  Result r = run("env CSAQ_FAULT_SIGNAL_AT=4 " + csaq() + quantize("out.h5"));
  ASSERT_EQ(r.rc, 75) << r.output;
  r = run(csaq() + quantize("out.h5", " --seed 7 --candidates 16"));
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("does not match this run"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("options.seed: checkpoint 0, this run 7"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("options.candidates: checkpoint 512, this run 16"), std::string::npos) << r.output;
  r = run(csaq() + quantize("other.h5", " --resume must"));
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--resume must: no committed checkpoint"), std::string::npos) << r.output;
  r = run(mpirun(2) + quantize("out.h5", " --resume never"));  // starts over, same result
  ASSERT_EQ(r.rc, 0) << r.output;
  EXPECT_EQ(r.output.find("[resume]"), std::string::npos) << r.output;
  expect_same_as_reference("out.h5");
}

TEST(Cluster, SlurmTaskCountMustMatchTheMpiWorld) {
  TempDir dir;
  Result r = run("env SLURM_NTASKS=4 " + csaq() + " eval --model " + dir.path() + " --data x.npy --seq-len 8");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("SLURM_NTASKS=4 but the MPI world has 1 rank"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("srun --mpi=pmix"), std::string::npos) << r.output;
}

TEST(Cluster, CommandsThatDoNotCalibrateEndAtSigterm) {
  TempDir dir;
  // 100,000 held-out tokens: their evaluation takes seconds, far beyond the signal.
  Result r = run(csaq() + " make-demo --out " + (dir / "demo") + " --tokens 400000");
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run("timeout --preserve-status -s TERM 1.5 " + csaq() + " eval --model " + (dir / "demo") + " --data " +
          (dir / "demo/heldout.txt") + " --seq-len 256");
  EXPECT_EQ(r.rc, 128 + SIGTERM) << r.output;
  EXPECT_EQ(r.output.find("perplexity:"), std::string::npos) << r.output;
}

TEST(Cluster, AnOutputThatIsAnInputIsRefused) {
  TempDir dir;
  make_demo(dir);
  if (HasFatalFailure()) return;
  Result r = run(csaq() + " quantize --model " + (dir / "demo") + " --calib " + (dir / "demo/calib.txt") +
                 " --target-bits 5 --group-options 32 --out " + (dir / "demo/calib.txt") + " --overwrite");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("is the input"), std::string::npos) << r.output;
  std::ifstream in(dir / "demo/calib.txt");
  EXPECT_FALSE(std::string((std::istreambuf_iterator<char>(in)), {}).empty());
}

}  // namespace
}  // namespace csaq
