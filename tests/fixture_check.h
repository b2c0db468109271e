// Runs a ../shared/fixtures model through the pipeline on a communicator and compares what
// the rank computes with the Hugging Face transformers reference (reference.safetensors).
#pragma once

#include <map>
#include <string>

#include "csaq/shard/comm.h"
#include "csaq/shard/pipeline.h"
#include "csaq/storage/safetensors.h"
#include "support.h"

namespace csaq::test {

struct FixtureRun {
  at::Tensor eval_logits;   // last rank: from Pipeline::evaluate
  at::Tensor calib_logits;  // last rank: from Pipeline::calibrate
  double eval_loss = 0.0;
  double calib_loss = 0.0;
  std::map<std::string, at::Tensor> grads;  // this rank's layers, by HF weight name
};

inline FixtureRun run_fixture(const std::string& dir, Communicator& comm, at::ScalarType dtype = at::kFloat) {
  ModelShard model = load_model_shard(dir, comm.rank(), comm.size(), dtype);
  auto ref = storage::SafetensorsFile::open(dir + "/reference.safetensors");
  const at::Tensor ids = ref->tensor("input_ids").clone();  // [2, 24]
  TokenSequences data(ids.reshape({-1}), ids.size(1), -1, "fixture input_ids");
  // One micro-batch of both sequences: its mean loss is the reference's loss.
  Pipeline pipeline(model, comm, PipelineOptions{ids.size(0), 2});
  FixtureRun run;
  run.eval_loss = pipeline.evaluate(data, [&](std::int64_t, const at::Tensor&, const at::Tensor& logits) {
                            run.eval_logits = logits.clone();
                          }).mean_nll();
  run.calib_loss =
      pipeline
          .calibrate(
              data,
              [&](const LayerGradients& g) {
                for (int j = 0; j < kNumLinears; ++j)
                  run.grads[hf_linear_name(g.layer->index, j)] = g.weight_grads[j].clone();
              },
              nullptr,
              [&](std::int64_t, const at::Tensor&, const at::Tensor& logits) { run.calib_logits = logits.clone(); })
          .mean_nll();
  return run;
}

// Relative errors allowed against the float32 reference.
struct Tolerance {
  double logits = 1e-4, loss = 1e-4, grads = 1e-3;  // float32 (fixtures/README.md)
};
// bfloat16 keeps 8 bits of mantissa (relative step 2^-8); errors compound over the layers.
inline constexpr Tolerance kBfloat16Tolerance{3e-2, 1e-3, 8e-2};

// Expects this rank's part of `run` to match the reference within `tol`, and all ranks
// together to have produced every reference gradient exactly once.
inline void expect_matches_reference(const FixtureRun& run, const std::string& dir, Communicator& comm,
                                     const Tolerance& tol = {}) {
  auto ref = storage::SafetensorsFile::open(dir + "/reference.safetensors");
  const double loss = ref->tensor("loss").item<double>();
  EXPECT_LT(std::abs(run.eval_loss - loss) / loss, tol.loss) << dir;
  EXPECT_LT(std::abs(run.calib_loss - loss) / loss, tol.loss) << dir;
  if (comm.rank() == comm.size() - 1) {
    ASSERT_TRUE(run.eval_logits.defined() && run.calib_logits.defined());
    EXPECT_LT(rel_error(run.eval_logits, ref->tensor("logits")), tol.logits) << dir;
    EXPECT_LT(rel_error(run.calib_logits, ref->tensor("logits")), tol.logits) << dir;
  }
  for (const auto& [name, grad] : run.grads) {
    ASSERT_TRUE(ref->contains("grad." + name)) << name;
    EXPECT_LT(rel_error(grad, ref->tensor("grad." + name)), tol.grads) << name;
  }
  std::int64_t expected = 0;
  for (const auto& [name, info] : ref->tensors()) expected += name.rfind("grad.", 0) == 0 ? 1 : 0;
  at::Tensor count = at::tensor({static_cast<std::int64_t>(run.grads.size())}, at::kLong);
  comm.all_reduce(count, ReduceOp::kSum);
  EXPECT_EQ(count.item<std::int64_t>(), expected) << "gradients handed out across all ranks";
}

inline const char* const kFixtures[] = {"fixtures/tiny-llama3", "fixtures/tiny-llama2", "fixtures/tiny-qwen2"};

}  // namespace csaq::test
