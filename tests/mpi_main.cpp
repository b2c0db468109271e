// main() for test binaries that run under mpirun: every rank runs every test on the MPI
// world communicator; rank 0 prints the usual report, other ranks print only their
// failures; a failed test aborts the job so that no rank waits on a peer that moved on.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cstdio>

#include "csaq/shard/comm.h"
#include "mpi_world.h"

namespace csaq::test {
namespace {
Communicator* g_world = nullptr;

class RankFailures : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailures(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed() && rank_ != 0)
      std::fprintf(stderr, "rank %d: %s:%d: %s\n", rank_, r.file_name() ? r.file_name() : "?",
                   r.line_number(), r.message());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::fprintf(stderr, "rank %d: %s.%s failed; aborting the job\n", rank_, info.test_suite_name(), info.name());
      std::fflush(stderr);
      MpiRuntime::abort(1);
    }
  }

 private:
  int rank_;
};
}  // namespace

Communicator& world() { return *g_world; }

}  // namespace csaq::test

int main(int argc, char** argv) {
  csaq::MpiRuntime mpi(&argc, &argv);
  auto world = mpi.world();
  csaq::test::g_world = world.get();
  at::set_num_threads(1);  // ranks share the machine's cores
  ::testing::InitGoogleTest(&argc, argv);
  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (world->rank() != 0) delete listeners.Release(listeners.default_result_printer());
  listeners.Append(new csaq::test::RankFailures(world->rank()));
  const int rc = RUN_ALL_TESTS();
  world.reset();
  return rc;
}
