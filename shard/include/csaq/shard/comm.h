// Point-to-point and collective communication between ranks, behind one interface.
//
// Implementations: LocalCommunicator (one process, world size 1) and the MPI communicator
// (CPU tensors). An NCCL communicator for CUDA tensors plugs in behind the same interface
// (CSAQ_WITH_NCCL). Every call is blocking; tensors must be contiguous. An operation a
// backend cannot do throws csaq::Error "<backend> communicator does not support <op> ...".
// Not thread-safe: call from one thread per rank.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>

namespace csaq {

enum class ReduceOp { kSum, kMax, kMin };

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Rank among the processes on this node (selects the GPU), and their number.
  virtual int local_rank() const = 0;
  virtual int local_size() const = 0;
  virtual std::string backend() const = 0;

  // Sends `tensor` to rank `dst`; the matching recv names the same tag.
  virtual void send(const at::Tensor& tensor, int dst, int tag) = 0;
  // Receives into the preallocated `tensor` (its shape and dtype must match the send).
  virtual void recv(at::Tensor& tensor, int src, int tag) = 0;
  // In place, on every rank.
  virtual void all_reduce(at::Tensor& tensor, ReduceOp op) = 0;
  virtual void broadcast(at::Tensor& tensor, int root) = 0;
  // Returns [size(), *tensor.shape]: row r is rank r's `tensor`.
  virtual at::Tensor all_gather(const at::Tensor& tensor) = 0;
  virtual void barrier() = 0;
};

// Rank `root`'s `text` on every rank (collective).
std::string broadcast_string(Communicator& comm, const std::string& text, int root = 0);

// Runs `check` on rank 0 only and makes its outcome every rank's (collective): when it throws
// a csaq::Error, every rank throws one with the same message, so that all stop alike.
void decide_on_rank0(Communicator& comm, const std::function<void()>& check);

// World size 1: collectives are identities, send/recv have no peer and throw.
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_rank() const override { return 0; }
  int local_size() const override { return 1; }
  std::string backend() const override { return "local"; }
  void send(const at::Tensor& tensor, int dst, int tag) override;
  void recv(at::Tensor& tensor, int src, int tag) override;
  void all_reduce(at::Tensor&, ReduceOp) override {}
  void broadcast(at::Tensor&, int) override {}
  at::Tensor all_gather(const at::Tensor& tensor) override;
  void barrier() override {}
};

// The MPI runtime of this process: MPI_Init on construction, MPI_Finalize on destruction.
// One per process, created first thing in main(); errors on MPI calls become csaq::Error.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  // A communicator over all processes of the job (MPI_COMM_WORLD).
  std::unique_ptr<Communicator> world() const;
  // Ends every rank of the job now with `code` (MPI_Abort). Used after a rank has printed
  // its error, so that no other rank waits forever for it.
  [[noreturn]] static void abort(int code);
};

}  // namespace csaq
