// Run under mpirun with 2 and 3 ranks (see CMakeLists.txt). Each distributed result is
// compared with the Hugging Face reference and, exactly, with the same computation done
// in a single process on the same rank.
#include "csaq/storage/error.h"
#include "fixture_check.h"
#include "mpi_world.h"
#include "support.h"

namespace csaq {
namespace {

TEST(MpiCommunicator, CollectivesAndPointToPointMatchTheirDefinitions) {
  Communicator& w = test::world();
  const int r = w.rank(), n = w.size();
  at::Tensor s = at::tensor({double(r + 1), -double(r)}, at::kDouble);
  w.all_reduce(s, ReduceOp::kSum);
  EXPECT_EQ(s[0].item<double>(), n * (n + 1) / 2.0);
  at::Tensor mx = at::tensor({r}, at::kLong);
  w.all_reduce(mx, ReduceOp::kMax);
  EXPECT_EQ(mx.item<std::int64_t>(), n - 1);
  at::Tensor mn = at::tensor({float(r) + 5.f}, at::kFloat);
  w.all_reduce(mn, ReduceOp::kMin);
  EXPECT_EQ(mn.item<float>(), 5.f);
  at::Tensor b = r == n - 1 ? at::arange(6, at::kFloat).to(at::kBFloat16) : at::zeros({6}, at::kBFloat16);
  w.broadcast(b, n - 1);
  EXPECT_TRUE(at::equal(b, at::arange(6, at::kFloat).to(at::kBFloat16)));
  at::Tensor g = w.all_gather(at::full({2}, r, at::kInt));
  ASSERT_EQ(g.sizes().vec(), (std::vector<std::int64_t>{n, 2}));
  for (int i = 0; i < n; ++i) EXPECT_EQ(g[i][1].item<int>(), i);
  // A ring: every rank sends its rank to the next and receives the previous one's.
  at::Tensor got = at::empty({3}, at::kFloat);
  if (r % 2 == 0) {
    w.send(at::full({3}, float(r)), (r + 1) % n, 7);
    w.recv(got, (r + n - 1) % n, 7);
  } else {
    w.recv(got, (r + n - 1) % n, 7);
    w.send(at::full({3}, float(r)), (r + 1) % n, 7);
  }
  EXPECT_TRUE(at::equal(got, at::full({3}, float((r + n - 1) % n))));
  at::Tensor half = at::ones({2}, at::kHalf);
  EXPECT_CSAQ_ERROR(w.all_reduce(half, ReduceOp::kSum), "MPI communicator does not support all_reduce", "Half");
  w.barrier();
}

TEST(MpiPipeline, FixturesMatchTransformersAndTheSingleProcessRunExactly) {
  CSAQ_REQUIRE_SHARED(root, "fixtures");
  Communicator& w = test::world();
  for (const char* fixture : test::kFixtures) {
    SCOPED_TRACE(fixture);
    const std::string dir = test::shared_path(fixture);
    const test::FixtureRun dist = test::run_fixture(dir, w);
    test::expect_matches_reference(dist, dir, w);
    LocalCommunicator local;
    const test::FixtureRun single = test::run_fixture(dir, local);
    EXPECT_EQ(dist.calib_loss, single.calib_loss);
    EXPECT_EQ(dist.eval_loss, single.eval_loss);
    if (w.rank() == w.size() - 1) {
      EXPECT_TRUE(at::equal(dist.calib_logits, single.calib_logits));
    }
    EXPECT_FALSE(dist.grads.empty());
    for (const auto& [name, grad] : dist.grads) EXPECT_TRUE(at::equal(grad, single.grads.at(name))) << name;
  }
}

TEST(MpiPipeline, Bfloat16DistributedRunEqualsTheSingleProcessRunExactly) {
  CSAQ_REQUIRE_SHARED(root, "fixtures");
  Communicator& w = test::world();
  for (const char* fixture : test::kFixtures) {
    SCOPED_TRACE(fixture);
    const std::string dir = test::shared_path(fixture);
    const test::FixtureRun dist = test::run_fixture(dir, w, at::kBFloat16);
    test::expect_matches_reference(dist, dir, w, test::kBfloat16Tolerance);
    LocalCommunicator local;
    const test::FixtureRun single = test::run_fixture(dir, local, at::kBFloat16);
    EXPECT_EQ(dist.calib_loss, single.calib_loss);
    for (const auto& [name, grad] : dist.grads) EXPECT_TRUE(at::equal(grad, single.grads.at(name))) << name;
  }
}

TEST(MpiPipeline, TinyStoriesPerplexityEqualsOneRankAndTheReference) {
  CSAQ_REQUIRE_SHARED(model_dir, "models/tinystories-656k");
  CSAQ_REQUIRE_SHARED(heldout, "data/tinystories-heldout.npy");
  Communicator& w = test::world();
  if (w.size() > 2) GTEST_SKIP() << "tinystories-656k has 2 decoder layers: at most 2 ranks";
  TokenSequences data = TokenSequences::from_npy(heldout, 512);
  ModelShard model = load_model_shard(model_dir, w.rank(), w.size());
  const double dist = std::exp(Pipeline(model, w, PipelineOptions{2, 1}).evaluate(data).mean_nll());
  EXPECT_NEAR(dist, 36.64, 36.64 * 1e-3);
  if (w.rank() == 0) {
    LocalCommunicator local;
    ModelShard whole = load_model_shard(model_dir, 0, 1);
    EXPECT_EQ(dist, std::exp(Pipeline(whole, local, PipelineOptions{2, 1}).evaluate(data).mean_nll()));
  }
}

}  // namespace
}  // namespace csaq
