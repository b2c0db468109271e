// Hostile inputs and environments: an output never replaces an input or anything that is not a
// regular file, a full disk ends every rank within a time bound and leaves no file, corrupt and
// absurd files are named, non-finite numbers stop the run. Each test runs the csaq executable.
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <functional>

#include "cli_support.h"
#include "csaq/packer/checkpoint.h"
#include "csaq/storage/error.h"
#include "csaq/storage/files.h"
#include "csaq/storage/h5.h"
#include "csaq/storage/safetensors.h"

namespace csaq {
namespace {
namespace fs = std::filesystem;

std::string contents(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Rewrites `model_dir`'s weights, each tensor passed through `edit` (which may add tensors).
void rewrite_weights(const std::string& model_dir,
                     const std::function<void(const std::string&, at::Tensor&)>& edit,
                     std::vector<storage::NamedTensor> extra = {}) {
  auto reader = storage::SafetensorsReader::open(model_dir);
  std::vector<storage::NamedTensor> tensors;
  for (const auto& name : reader.names()) {
    at::Tensor t = reader.load(name).clone();
    edit(name, t);
    tensors.emplace_back(name, t);
  }
  for (auto& e : extra) tensors.push_back(std::move(e));
  storage::write_safetensors(model_dir + "/model.safetensors", tensors, {}, /*overwrite=*/true);
}

void edit_config(const std::string& model_dir, const std::function<void(json&)>& edit) {
  json j = read_json(model_dir + "/config.json");
  edit(j);
  std::ofstream(model_dir + "/config.json") << j.dump(2);
}

class Safety : public ::testing::Test {
 protected:
  void SetUp() override { make_demo(dir); }
  std::string model() const { return dir / "demo"; }
  std::string eval(const std::string& model_dir, const std::string& extra = "") const {
    return " eval --model " + model_dir + " --data " + (dir / "demo/tokens.npy") + " --seq-len 64 --max-sequences 2" +
           extra;
  }
  // A salience file and a plan for the demo model (the inputs of `pack`).
  void stage() const {
    Result r = run(csaq() + " profile --model " + model() + " --calib " + (dir / "demo/tokens.npy") +
                   " --seq-len 64 --samples 8 --out " + (dir / "s.h5"));
    ASSERT_EQ(r.rc, 0) << r.output;
    r = run(csaq() + " solve --model " + model() + " --profile " + (dir / "s.h5") +
            " --bit-options 2,4,8 --group-options 32 --target-bits 4 --out " + (dir / "plan.h5"));
    ASSERT_EQ(r.rc, 0) << r.output;
  }
  std::string pack(const std::string& out) const {
    return " pack --model " + model() + " --plan " + (dir / "plan.h5") + " --profile " + (dir / "s.h5") +
           " --out " + out;
  }
  TempDir dir;
};

TEST_F(Safety, AnOutputThatIsAnInputIsRefusedBeforeAnyWork) {
  const std::string weights = contents(dir / "demo/model.safetensors");
  const std::string calib = " --calib " + (dir / "demo/tokens.npy") + " --seq-len 64 --samples 8 --target-bits 4";
  Result r = run(csaq() + " quantize --model " + model() + calib + " --out " + (dir / "demo/model.safetensors") +
                 " --overwrite");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("of the input --model"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("[profile]"), std::string::npos) << "must fail before calibrating";
  EXPECT_EQ(contents(dir / "demo/model.safetensors"), weights);

  const std::string tokens = contents(dir / "demo/tokens.npy"), config = contents(dir / "demo/config.json");
  ASSERT_EQ(::link((dir / "demo/config.json").c_str(), (dir / "alias.json").c_str()), 0);  // same file, other name
  for (const std::string& report : {dir / "demo/tokens.npy", dir / "demo/config.json", dir / "alias.json"}) {
    r = run(csaq() + eval(model(), " --report " + report + " --overwrite"));
    EXPECT_EQ(r.rc, 1) << report;
    EXPECT_NE(r.output.find("choose another output path"), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("perplexity"), std::string::npos) << r.output;
  }
  EXPECT_EQ(contents(dir / "demo/tokens.npy"), tokens);
  EXPECT_EQ(contents(dir / "demo/config.json"), config);

  r = run(csaq() + " quantize --model " + model() + calib + " --out " + (dir / "q.h5") + " --report " +
          (dir / "q.h5") + " --overwrite");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--report and --out name the same file"), std::string::npos) << r.output;
  r = run(csaq() + " quantize --model " + model() + calib + " --out " + (dir / "q.h5") + " --report " +
          (dir / "missing/q.json"));
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("the directory of --report"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("[profile]"), std::string::npos) << "must fail before calibrating";

  stage();
  if (HasFatalFailure()) return;
  const std::string plan = contents(dir / "plan.h5");
  r = run(csaq() + pack(dir / "plan.h5") + " --overwrite");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("is the input --plan"), std::string::npos) << r.output;
  EXPECT_EQ(contents(dir / "plan.h5"), plan);
  r = run(csaq() + pack(dir / "q.h5"));
  ASSERT_EQ(r.rc, 0) << r.output;
  // export: a file in --out that is the checkpoint being exported, under another name.
  fs::create_directory(dir / "exported");
  ASSERT_EQ(::link((dir / "q.h5").c_str(), (dir / "exported/model.safetensors").c_str()), 0);
  const std::string packed = contents(dir / "q.h5");
  r = run(csaq() + " export --quantized " + (dir / "q.h5") + " --out " + (dir / "exported") + " --overwrite");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.output.find("--quantized"), std::string::npos) << r.output;
  EXPECT_EQ(contents(dir / "q.h5"), packed);
}

TEST_F(Safety, SomethingThatIsNotARegularFileIsNeverReplaced) {
  ASSERT_EQ(::mkfifo((dir / "fifo").c_str(), 0600), 0);
  fs::create_directory(dir / "folder");
  std::vector<std::string> targets{dir / "fifo", dir / "folder"};
  // A device node of its own (the null device's numbers), so that no real one is at risk.
  if (::mknod((dir / "null").c_str(), S_IFCHR | 0600, makedev(1, 3)) == 0) targets.push_back(dir / "null");
  for (const auto& target : targets) {
    const Result r = run(csaq() + eval(model(), " --report " + target + " --overwrite"), /*timeout_s=*/60);
    EXPECT_EQ(r.rc, 1) << target << "\n" << r.output;
    EXPECT_NE(r.output.find("replaces nothing else"), std::string::npos) << r.output;
  }
  struct stat st {};
  EXPECT_TRUE(::lstat((dir / "fifo").c_str(), &st) == 0 && S_ISFIFO(st.st_mode));
  EXPECT_TRUE(fs::is_directory(dir / "folder") && fs::is_empty(dir / "folder"));
  if (targets.size() == 3) {
    EXPECT_TRUE(::lstat((dir / "null").c_str(), &st) == 0 && S_ISCHR(st.st_mode));
  }
}

TEST_F(Safety, TwoRunsWritingOneOutputLeaveOneReadableCheckpoint) {
  stage();
  if (HasFatalFailure()) return;
  const std::string cmd = csaq() + pack(dir / "q.h5");
  const Result r = run("sh -c '(" + cmd + " > " + (dir / "a.log") + " 2>&1; echo $? > " + (dir / "a.rc") + ") & (" +
                       cmd + " > " + (dir / "b.log") + " 2>&1; echo $? > " + (dir / "b.rc") + ") & wait'");
  ASSERT_EQ(r.rc, 0) << r.output;
  const int a = std::stoi(contents(dir / "a.rc")), b = std::stoi(contents(dir / "b.rc"));
  EXPECT_EQ(a + b, 1) << "exactly one run writes the file\n" << contents(dir / "a.log") << contents(dir / "b.log");
  const std::string failed = contents(dir / (a != 0 ? "a.log" : "b.log"));
  EXPECT_TRUE(failed.find("already exists") != std::string::npos ||
              failed.find("appeared while csaq was writing it; kept it") != std::string::npos)
      << failed;
  const QuantizedCheckpoint q(dir / "q.h5");  // readable, checksums and structure verified
  for (const auto& name : q.tensor_names()) EXPECT_TRUE(at::isfinite(q.tensor(name)).all().item<bool>()) << name;
  for (const auto& e : fs::directory_iterator(dir.path()))
    EXPECT_EQ(e.path().string().find(".partial"), std::string::npos) << "left behind: " << e.path();
}

// A small filesystem (a tmpfs mounted here when the test may mount, else the write-fault hook).
class FullDisk : public Safety {
 protected:
  void SetUp() override {
    Safety::SetUp();
    fs::create_directory(dir / "small");
    mounted = ::mount("tmpfs", (dir / "small").c_str(), "tmpfs", 0, "size=64k") == 0;
    if (!mounted) std::printf("no tmpfs (mount: %s): the write-fault hook stands in for a full disk\n", std::strerror(errno));
  }
  void TearDown() override {
    if (mounted) ::umount2((dir / "small").c_str(), MNT_DETACH);
  }
  std::string fault() const { return mounted ? "" : "env CSAQ_FAULT_ENOSPC_AFTER=20 "; }
  bool mounted = false;
};

TEST_F(FullDisk, PackingEndsEveryRankWithTheMessageAndLeavesNoFile) {
  stage();
  if (HasFatalFailure()) return;
  for (int ranks : {1, 2}) {
    const Result r = run(fault() + (ranks == 1 ? csaq() : mpirun(ranks)) + pack(dir / "small/q.h5"), /*timeout_s=*/60);
    EXPECT_NE(r.rc, 124) << ranks << " rank(s) hung\n" << r.output;
    EXPECT_NE(r.rc, 0) << r.output;
    if (ranks == 1) {
      EXPECT_EQ(r.rc, 1) << "an error, not a crash\n" << r.output;
    }
    EXPECT_NE(r.output.find("No space left on device"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("small/q.h5"), std::string::npos) << r.output;
    for (const auto& e : fs::directory_iterator(dir / "small")) ADD_FAILURE() << "left behind: " << e.path();
  }
}

TEST_F(Safety, ModelFilesThatAreNotRegularFilesAreNamed) {
  fs::copy(model(), dir / "m");
  fs::remove(dir / "m/model.safetensors");
  ASSERT_EQ(::mkfifo((dir / "m/model.safetensors").c_str(), 0600), 0);
  Result r = run(csaq() + eval(dir / "m"), /*timeout_s=*/60);
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("model.safetensors' is a FIFO"), std::string::npos) << r.output;
  fs::remove(dir / "m/model.safetensors");
  fs::create_directory(dir / "m/model.safetensors");
  r = run(csaq() + eval(dir / "m"), /*timeout_s=*/60);
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("model.safetensors' is a directory"), std::string::npos) << r.output;
  fs::copy_file(model() + "/model.safetensors", dir / "m/weights.safetensors");
  fs::remove(dir / "m/config.json");
  ASSERT_EQ(::mkfifo((dir / "m/config.json").c_str(), 0600), 0);
  r = run(csaq() + eval(dir / "m"), /*timeout_s=*/60);
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("config.json' is a FIFO"), std::string::npos) << r.output;
}

TEST_F(Safety, AbsurdSizesAreRefusedBeforeAnythingIsAllocated) {
  const std::string config = contents(model() + "/config.json");
  auto expect_refused = [&](const std::function<void(json&)>& edit, const std::string& message) {
    std::ofstream(model() + "/config.json") << config;
    edit_config(model(), edit);
    const Result r = run(csaq() + eval(model()), /*timeout_s=*/60);
    EXPECT_EQ(r.rc, 1) << r.output;
    EXPECT_NE(r.output.find(message), std::string::npos) << r.output;
  };
  expect_refused([](json& j) { j["num_hidden_layers"] = 1000000000; }, "hold 3 decoder layers");
  expect_refused([](json& j) { j["num_hidden_layers"] = 2; }, "model.layers.2.");
  expect_refused([](json& j) { j["hidden_size"] = std::int64_t{1} << 62; }, "more than any tensor index can hold");
  expect_refused([](json& j) { j["vocab_size"] = std::int64_t{1} << 60; }, "more than any tensor index can hold");
  expect_refused([](json& j) { j["torch_dtype"] = 5; }, "key 'torch_dtype' must be a dtype name");
  std::ofstream(model() + "/config.json") << config;

  // A token file whose header promises more ids than int64 can count.
  const std::string header = "{'descr': '<i8', 'fortran_order': False, 'shape': (99999999999999999999999,), }\n";
  std::ofstream(dir / "huge.npy", std::ios::binary)
      << std::string("\x93NUMPY\x01\x00", 8) << static_cast<char>(header.size()) << '\0' << header;
  const Result r = run(csaq() + " eval --model " + model() + " --data " + (dir / "huge.npy") + " --seq-len 64");
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("huge.npy': malformed shape"), std::string::npos) << r.output;
}

TEST_F(Safety, ConfigValuesOutOfRangeAreNamedOrWarnedAbout) {
  const std::string config = contents(model() + "/config.json");
  for (double factor : {0.0, -2.0}) {
    edit_config(model(), [&](json& j) { j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", factor}}; });
    const Result r = run(csaq() + eval(model()));
    EXPECT_EQ(r.rc, 1) << r.output;
    EXPECT_NE(r.output.find("'rope_scaling.factor' must be a positive number"), std::string::npos) << r.output;
    std::ofstream(model() + "/config.json") << config;
  }
  Result r = run(csaq() + " quantize --model " + model() + " --calib " + (dir / "demo/tokens.npy") +
                 " --seq-len 64 --target-bits 4 --clique-threshold -1 --out " + (dir / "q.h5"));
  EXPECT_EQ(r.rc, 2) << r.output;
  EXPECT_NE(r.output.find("--clique-threshold"), std::string::npos) << r.output;
  edit_config(model(), [](json& j) { j["max_position_embeddings"] = 32; });
  r = run(csaq() + eval(model()));
  EXPECT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("warning: --seq-len 64 exceeds the model's max_position_embeddings 32"), std::string::npos)
      << r.output;
  std::ofstream(model() + "/config.json") << config;
  // A tensor the config does not describe is named, not silently dropped.
  rewrite_weights(model(), [](const std::string&, at::Tensor&) {},
                  {{"model.vision_tower.proj.weight", at::ones({4, 4})}});
  r = run(csaq() + eval(model()));
  EXPECT_EQ(r.rc, 0) << r.output;
  EXPECT_NE(r.output.find("model.vision_tower.proj.weight"), std::string::npos) << r.output;
}

TEST_F(Safety, NonFiniteWeightsAndLossesStopTheRunNamingWhere) {
  const std::string quantize = " quantize --model " + model() + " --calib " + (dir / "demo/tokens.npy") +
                               " --seq-len 64 --samples 8 --group-options 32 --target-bits 4 --out " + (dir / "q.h5");
  const std::string weights = contents(model() + "/model.safetensors");
  rewrite_weights(model(), [](const std::string& name, at::Tensor& t) {
    if (name == "model.layers.1.mlp.up_proj.weight") t.view(-1)[17] = std::nan("");
  });
  Result r = run(mpirun(2) + quantize);
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("model.layers.1.mlp.up_proj.weight"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("1 values that are NaN or infinite"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "q.h5"));
  // Finite weights whose logits overflow float32: the loss of the first micro-batch is inf.
  std::ofstream(model() + "/model.safetensors", std::ios::binary) << weights;
  rewrite_weights(model(), [](const std::string& name, at::Tensor& t) {
    if (name == "lm_head.weight") t.mul_(1e37);
  });
  r = run(csaq() + quantize);
  EXPECT_EQ(r.rc, 1) << r.output;
  EXPECT_NE(r.output.find("the loss of micro-batch 0 (sequences 0 to"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "q.h5"));
}

// Copies every dataset of `from` into a new file `to`, passing each through `edit`; the
// checksums are the original ones (`keep_checksums`) or those of what was written.
void copy_checkpoint(const std::string& from, const std::string& to, bool keep_checksums,
                     const std::function<void(const std::string&, at::Tensor&)>& edit) {
  const storage::H5File in = storage::H5File::open_read(from);
  storage::H5File out = storage::H5File::create(to, /*collective=*/false);
  std::function<void(const std::string&)> walk = [&](const std::string& group) {
    for (const auto& n : in.list(group)) {
      const std::string path = group.empty() ? n : group + "/" + n;
      if (path == storage::H5File::kChecksums) continue;
      at::Tensor t;
      try {
        t = in.read(path);
      } catch (const Error&) {  // a group
        walk(path);
        continue;
      }
      edit(path, t);
      out.put(path, t);
    }
  };
  walk("");
  const std::string sums = keep_checksums ? in.read_text(storage::H5File::kChecksums)
                                          : json(out.written_checksums()).dump();
  out.put_text(storage::H5File::kChecksums, sums);
  out.close();
}

TEST_F(Safety, CorruptedCheckpointsAreDetectedNamingTheDataset) {
  Result r = run(csaq() + " quantize --model " + model() + " --calib " + (dir / "demo/tokens.npy") +
                 " --seq-len 64 --samples 8 --bit-options 2,4,8 --group-options 32 --target-bits 4 --out " +
                 (dir / "q.h5"));
  ASSERT_EQ(r.rc, 0) << r.output;
  r = run(csaq() + " eval --quantized " + (dir / "q.h5") + " --data " + (dir / "demo/tokens.npy") + " --seq-len 64 --max-sequences 2");
  ASSERT_EQ(r.rc, 0) << r.output;
  const std::string codes = "linear/1/self_attn.o_proj/codes";
  ASSERT_TRUE(storage::H5File::open_read(dir / "q.h5").exists(codes));
  copy_checkpoint(dir / "q.h5", dir / "flipped.h5", /*keep_checksums=*/true, [&](const std::string& name, at::Tensor& t) {
    if (name == codes) {
      at::Tensor bytes = t.view(at::kByte).view(-1);
      bytes[5] = 255 - bytes[5].item<int>();
    }
  });
  for (const std::string& command : {" eval --quantized " + (dir / "flipped.h5") + " --data " + (dir / "demo/tokens.npy") + " --seq-len 64 --max-sequences 2",
                                    " inspect " + (dir / "flipped.h5")}) {
    r = run(csaq() + command);
    EXPECT_EQ(r.rc, 1) << r.output;
    EXPECT_NE(r.output.find("'" + codes + "'"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("corrupted"), std::string::npos) << r.output;
  }
  // Consistent checksums, inconsistent structure (what a faulty writer would leave).
  const std::string formats = "linear/0/mlp.down_proj/formats";  // [F, 2]: bits, group of each format
  ASSERT_TRUE(storage::H5File::open_read(dir / "q.h5").exists(formats));
  copy_checkpoint(dir / "q.h5", dir / "skewed.h5", /*keep_checksums=*/false, [&](const std::string& name, at::Tensor& t) {
    if (name == formats) t[0][0] += 1;  // a bit width its codes were not written with
  });
  for (const std::string& command : {" eval --quantized " + (dir / "skewed.h5") + " --data " + (dir / "demo/tokens.npy") + " --seq-len 64 --max-sequences 2",
                                    " inspect " + (dir / "skewed.h5")}) {
    r = run(csaq() + command);
    EXPECT_EQ(r.rc, 1) << r.output;
    EXPECT_NE(r.output.find("skewed.h5': linear/0/mlp.down_proj/"), std::string::npos) << r.output;
  }
}

}  // namespace
}  // namespace csaq
