// Calibration and evaluation text as fixed-length token sequences.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>

#include "csaq/storage/tokenizer.h"

namespace csaq {

// A token stream cut into non-overlapping sequences of seq_len tokens; the remainder that
// does not fill a sequence is dropped. Every rank holds the same (small) stream, so that
// the first rank can embed and the last rank can score any micro-batch.
class TokenSequences {
 public:
  // `tokens`: 1-D integer tensor; `source` names it in messages. `max_sequences` < 0: all.
  TokenSequences(at::Tensor tokens, std::int64_t seq_len, std::int64_t max_sequences,
                 std::string source);
  // Reads a 1-D .npy token file (see storage/npy.h).
  static TokenSequences from_npy(const std::string& path, std::int64_t seq_len,
                                 std::int64_t max_sequences = -1);
  // `count` windows of seq_len tokens starting at uniformly random offsets of `tokens`
  // (GPTQ's calibration sampling), drawn from a generator seeded with `seed`.
  static TokenSequences random_windows(const at::Tensor& tokens, std::int64_t seq_len, std::int64_t count,
                                       std::uint64_t seed, std::string source);

  std::int64_t size() const { return count_; }
  std::int64_t seq_len() const { return seq_len_; }
  std::int64_t tokens() const { return count_ * seq_len_; }
  const std::string& source() const { return source_; }
  // Sequences [first, first + count) as an int64 tensor [count, seq_len].
  at::Tensor batch(std::int64_t first, std::int64_t count) const;
  // Throws naming the source and position when a token id is outside [0, vocab_size).
  void check_vocabulary(std::int64_t vocab_size) const;

 private:
  at::Tensor tokens_;  // int64, exactly count_ * seq_len_ tokens
  std::int64_t seq_len_;
  std::int64_t count_;
  std::string source_;
};

// Where text finds its tokenizer; called only when an input is text.
using TokenizerLoader = std::function<storage::Tokenizer()>;
// Tokenizer::load(dir); an empty `dir` gives an error asking for --tokenizer.
TokenizerLoader tokenizer_in(const std::string& dir);

// The token stream of an input file: .npy as stored; .txt (UTF-8, one document) or .jsonl
// (one JSON object per line with a "text" string, each a document) tokenized with
// `tokenizer`, documents joined with its EOS token (when it has one). Errors name the file
// and line.
at::Tensor load_token_stream(const std::string& path, const TokenizerLoader& tokenizer);

enum class Sampling { kContiguous, kRandom };
Sampling parse_sampling(const std::string& name);

// Sequences of `path` (see load_token_stream): contiguous non-overlapping windows, or
// `count` random windows (count < 0: as many as contiguous windows would give).
TokenSequences load_sequences(const std::string& path, const TokenizerLoader& tokenizer, std::int64_t seq_len,
                              std::int64_t count, Sampling sampling, std::uint64_t seed);

}  // namespace csaq
