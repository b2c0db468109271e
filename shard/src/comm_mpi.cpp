#include <mpi.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>

#include "csaq/shard/comm.h"
#include "csaq/storage/error.h"

namespace csaq {
namespace {

int world_rank() {
  int r = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return std::string(text, static_cast<std::size_t>(len));
}

#define CSAQ_MPI(call)                                                                      \
  do {                                                                                      \
    int csaq_mpi_rc_ = (call);                                                              \
    CSAQ_CHECK(csaq_mpi_rc_ == MPI_SUCCESS, "rank ", world_rank(), ": ", #call, " failed: ", \
               mpi_error_string(csaq_mpi_rc_));                                             \
  } while (0)

// MPI datatype of a tensor's elements for reductions; nullptr where MPI has none.
MPI_Datatype reduce_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kInt: return MPI_INT32_T;
    case at::kLong: return MPI_INT64_T;
    case at::kByte: return MPI_UINT8_T;
    case at::kChar: return MPI_INT8_T;
    case at::kShort: return MPI_INT16_T;
    default: return MPI_DATATYPE_NULL;
  }
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return MPI_SUM;
    case ReduceOp::kMax: return MPI_MAX;
    case ReduceOp::kMin: return MPI_MIN;
  }
  return MPI_SUM;
}

void check_cpu_contiguous(const at::Tensor& t, const char* op) {
  CSAQ_CHECK(t.defined() && t.device().is_cpu(), "MPI communicator does not support ", op,
             " on ", t.defined() ? t.device().str() : std::string("undefined"),
             " tensors (CPU only)");
  CSAQ_CHECK(t.is_contiguous(), "MPI communicator: ", op, " needs a contiguous tensor");
}

// MPI counts are ints: move byte buffers in chunks below INT_MAX.
constexpr std::size_t kChunk = static_cast<std::size_t>(INT_MAX) / 8 * 8;

// Calls f(offset, count) for consecutive chunks of n bytes; once with count 0 when n is 0,
// so that an empty send still matches its recv.
template <typename F>
void for_each_chunk(std::size_t n, F f) {
  std::size_t off = 0;
  do {
    const std::size_t count = std::min(kChunk, n - off);
    f(off, static_cast<int>(count));
    off += count;
  } while (off < n);
}

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    CSAQ_MPI(MPI_Comm_rank(comm_, &rank_));
    CSAQ_MPI(MPI_Comm_size(comm_, &size_));
    MPI_Comm node;
    CSAQ_MPI(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node));
    CSAQ_MPI(MPI_Comm_rank(node, &local_rank_));
    CSAQ_MPI(MPI_Comm_size(node, &local_size_));
    MPI_Comm_free(&node);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  std::string backend() const override { return "mpi"; }

  void send(const at::Tensor& t, int dst, int tag) override {
    check_cpu_contiguous(t, "send");
    auto* p = static_cast<const char*>(t.data_ptr());
    for_each_chunk(t.nbytes(), [&](std::size_t off, int count) {
      CSAQ_MPI(MPI_Send(p + off, count, MPI_BYTE, dst, tag, comm_));
    });
  }

  void recv(at::Tensor& t, int src, int tag) override {
    check_cpu_contiguous(t, "recv");
    auto* p = static_cast<char*>(t.data_ptr());
    for_each_chunk(t.nbytes(), [&](std::size_t off, int count) {
      MPI_Status status;
      CSAQ_MPI(MPI_Recv(p + off, count, MPI_BYTE, src, tag, comm_, &status));
      int got = 0;
      MPI_Get_count(&status, MPI_BYTE, &got);
      CSAQ_CHECK(got == count, "rank ", rank_, ": received ", got, " bytes from rank ", src,
                 " where ", count, " were expected (tag ", tag, ")");
    });
  }

  void all_reduce(at::Tensor& t, ReduceOp op) override {
    check_cpu_contiguous(t, "all_reduce");
    MPI_Datatype type = reduce_type(t.scalar_type());
    CSAQ_CHECK(type != MPI_DATATYPE_NULL, "MPI communicator does not support all_reduce on ",
               c10::toString(t.scalar_type()), " tensors");
    const std::size_t elem = t.element_size();
    const std::size_t per_chunk = kChunk / elem;
    auto* p = static_cast<char*>(t.data_ptr());
    const std::size_t n = static_cast<std::size_t>(t.numel());
    for (std::size_t off = 0; off < n; off += per_chunk) {
      const int count = static_cast<int>(std::min(per_chunk, n - off));
      CSAQ_MPI(MPI_Allreduce(MPI_IN_PLACE, p + off * elem, count, type, mpi_op(op), comm_));
    }
  }

  void broadcast(at::Tensor& t, int root) override {
    check_cpu_contiguous(t, "broadcast");
    auto* p = static_cast<char*>(t.data_ptr());
    for_each_chunk(t.nbytes(), [&](std::size_t off, int count) {
      CSAQ_MPI(MPI_Bcast(p + off, count, MPI_BYTE, root, comm_));
    });
  }

  at::Tensor all_gather(const at::Tensor& t) override {
    check_cpu_contiguous(t, "all_gather");
    CSAQ_CHECK(t.nbytes() <= kChunk, "MPI communicator does not support all_gather of more than ",
               kChunk, " bytes per rank");
    std::vector<std::int64_t> shape{size_};
    for (auto d : t.sizes()) shape.push_back(d);
    at::Tensor out = at::empty(shape, t.options());
    const int count = static_cast<int>(t.nbytes());
    CSAQ_MPI(MPI_Allgather(t.data_ptr(), count, MPI_BYTE, out.data_ptr(), count, MPI_BYTE, comm_));
    return out;
  }

  void barrier() override { CSAQ_MPI(MPI_Barrier(comm_)); }

 private:
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
};

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int provided = 0;
  CSAQ_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) == MPI_SUCCESS,
             "MPI_Init_thread failed");
  // Return error codes instead of aborting inside MPI, so that messages name the call.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

std::unique_ptr<Communicator> MpiRuntime::world() const {
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD);
}

void MpiRuntime::abort(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace csaq
