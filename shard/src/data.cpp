#include "csaq/shard/data.h"

#include <ATen/ATen.h>

#include <ATen/CPUGeneratorImpl.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "csaq/storage/error.h"
#include "csaq/storage/files.h"
#include "csaq/storage/npy.h"
#include "csaq/storage/tokenizer.h"

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

TokenSequences TokenSequences::random_windows(const at::Tensor& tokens, std::int64_t seq_len, std::int64_t count,
                                              std::uint64_t seed, std::string source) {
  const std::int64_t n = tokens.numel();
  CSAQ_CHECK(seq_len >= 2, "--seq-len must be at least 2 (got ", seq_len, ")");
  CSAQ_CHECK(n >= seq_len, source, " has ", n, " tokens, fewer than one sequence of --seq-len ", seq_len);
  CSAQ_CHECK(count >= 1, "the number of calibration sequences must be at least 1 (got ", count, ")");
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const at::Tensor starts = at::randint(n - seq_len + 1, {count}, gen, at::kLong);
  const at::Tensor index = (starts.unsqueeze(1) + at::arange(seq_len, at::kLong)).reshape({-1});
  return TokenSequences(tokens.to(at::kLong).index_select(0, index), seq_len, count, std::move(source));
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

TokenizerLoader tokenizer_in(const std::string& dir) {
  return [dir] {
    CSAQ_CHECK(!dir.empty(), "it needs the model's tokenizer (--tokenizer DIR)");
    return storage::Tokenizer::load(dir);
  };
}

at::Tensor load_token_stream(const std::string& path, const TokenizerLoader& tokenizer) {
  auto ends_with = [&](const char* ext) {
    const std::string e(ext);
    return path.size() >= e.size() && path.compare(path.size() - e.size(), e.size(), e) == 0;
  };
  if (ends_with(".npy")) return storage::read_npy_tokens(path);
  CSAQ_CHECK(ends_with(".txt") || ends_with(".jsonl"), "input '", path,
             "': unknown kind of file (expected .npy token ids, .txt or .jsonl text)");
  const storage::Tokenizer tok = [&] {
    try {
      return tokenizer();
    } catch (const Error& e) {
      CSAQ_FAIL("input '", path, "' is text: ", e.what());
    }
  }();
  std::vector<std::int64_t> ids;
  auto add_document = [&](const std::string& text) {
    if (!ids.empty() && tok.eos_id()) ids.push_back(*tok.eos_id());
    const auto doc = tok.encode(text);
    ids.insert(ids.end(), doc.begin(), doc.end());
  };
  if (ends_with(".txt")) {
    add_document(storage::read_text_file(path));
  } else {
    std::ifstream in(path);
    CSAQ_CHECK(in, "cannot open '", path, "'");
    std::string line;
    for (std::int64_t number = 1; std::getline(in, line); ++number) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        CSAQ_FAIL("'", path, "' line ", number, ": malformed JSON: ", e.what());
      }
      CSAQ_CHECK(j.is_object() && j.contains("text") && j["text"].is_string(), "'", path, "' line ", number,
                 ": expected an object with a \"text\" string");
      add_document(j["text"].get<std::string>());
    }
  }
  return at::tensor(ids, at::kLong);
}

Sampling parse_sampling(const std::string& name) {
  if (name == "random") return Sampling::kRandom;
  if (name == "contiguous") return Sampling::kContiguous;
  CSAQ_FAIL("unknown sampling '", name, "' (choose random or contiguous)");
}

TokenSequences load_sequences(const std::string& path, const TokenizerLoader& tokenizer, std::int64_t seq_len,
                              std::int64_t count, Sampling sampling, std::uint64_t seed) {
  const at::Tensor tokens = load_token_stream(path, tokenizer);
  const std::string source = "'" + path + "'";
  if (sampling == Sampling::kContiguous) return TokenSequences(tokens, seq_len, count, source);
  if (count < 0) count = std::max<std::int64_t>(1, tokens.numel() / std::max<std::int64_t>(1, seq_len));
  return TokenSequences::random_windows(tokens, seq_len, count, seed, source);
}

}  // namespace csaq
