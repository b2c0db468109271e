#include "csaq/shard/data.h"

#include <ATen/ATen.h>

#include "csaq/storage/error.h"
#include "csaq/storage/npy.h"

namespace csaq {

TokenSequences::TokenSequences(at::Tensor tokens, std::int64_t seq_len, std::int64_t max_sequences,
                               std::string source)
    : seq_len_(seq_len), source_(std::move(source)) {
  CSAQ_CHECK(tokens.dim() == 1, "tokens from ", source_, " must be 1-D");
  CSAQ_CHECK(seq_len >= 2, "--seq-len must be at least 2 (got ", seq_len, ")");
  const std::int64_t available = tokens.numel() / seq_len;
  CSAQ_CHECK(available >= 1, source_, " has ", tokens.numel(),
             " tokens, fewer than one sequence of --seq-len ", seq_len);
  count_ = max_sequences < 0 ? available : std::min(available, max_sequences);
  CSAQ_CHECK(count_ >= 1, "--max-sequences must be at least 1 (got ", max_sequences, ")");
  tokens_ = tokens.slice(0, 0, count_ * seq_len).to(at::kLong).contiguous();
}

TokenSequences TokenSequences::from_npy(const std::string& path, std::int64_t seq_len,
                                        std::int64_t max_sequences) {
  return TokenSequences(storage::read_npy_tokens(path), seq_len, max_sequences,
                        "token file '" + path + "'");
}

at::Tensor TokenSequences::batch(std::int64_t first, std::int64_t count) const {
  CSAQ_ASSERT(first >= 0 && count >= 1 && first + count <= count_);
  return tokens_.slice(0, first * seq_len_, (first + count) * seq_len_).view({count, seq_len_});
}

void TokenSequences::check_vocabulary(std::int64_t vocab_size) const {
  at::Tensor bad = at::logical_or(tokens_ < 0, tokens_ >= vocab_size).nonzero();
  if (bad.numel() == 0) return;
  const std::int64_t pos = bad[0][0].item<std::int64_t>();
  CSAQ_FAIL(source_, ": token id ", tokens_[pos].item<std::int64_t>(), " at position ", pos,
            " is outside the model's vocabulary [0, ", vocab_size, ")");
}

}  // namespace csaq
