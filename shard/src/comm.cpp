#include <ATen/ATen.h>

#include <algorithm>

#include "csaq/shard/comm.h"
#include "csaq/storage/error.h"

namespace csaq {

std::string broadcast_string(Communicator& comm, const std::string& text, int root) {
  at::Tensor len = at::tensor({static_cast<std::int64_t>(text.size())}, at::kLong);
  comm.broadcast(len, root);
  at::Tensor bytes = at::zeros({len.item<std::int64_t>()}, at::kByte);
  if (comm.rank() == root) std::copy(text.begin(), text.end(), reinterpret_cast<char*>(bytes.data_ptr()));
  comm.broadcast(bytes, root);
  const char* p = reinterpret_cast<const char*>(bytes.data_ptr());
  return std::string(p, p + bytes.numel());
}

void decide_on_rank0(Communicator& comm, const std::function<void()>& check) {
  std::string refusal;
  if (comm.rank() == 0) {
    try {
      check();
    } catch (const Error& e) {
      refusal = e.what();
    }
  }
  refusal = broadcast_string(comm, refusal);
  CSAQ_CHECK(refusal.empty(), refusal);
}

}  // namespace csaq
