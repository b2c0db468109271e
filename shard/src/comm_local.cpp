#include "csaq/shard/comm.h"

#include "csaq/storage/error.h"

namespace csaq {

void LocalCommunicator::send(const at::Tensor&, int dst, int) {
  CSAQ_FAIL("local communicator does not support send (world size 1, destination rank ", dst, ")");
}

void LocalCommunicator::recv(at::Tensor&, int src, int) {
  CSAQ_FAIL("local communicator does not support recv (world size 1, source rank ", src, ")");
}

at::Tensor LocalCommunicator::all_gather(const at::Tensor& tensor) { return tensor.unsqueeze(0).clone(); }

}  // namespace csaq
