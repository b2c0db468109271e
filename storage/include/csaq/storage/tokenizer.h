// Hugging Face tokenizers in C++: tokenizer.json with a BPE model, either SentencePiece-style
// (metaspace "▁", byte fallback to <0xNN> tokens: Llama 2, Mistral, TinyStories) or
// byte-level (GPT-2, Llama 3, Qwen2: bytes mapped to printable characters, a regex
// pre-tokenizer). Added and special tokens are matched in the raw text first. BOS/EOS follow
// tokenizer_config.json (add_bos_token / add_eos_token) or else the post-processor template.
// Where transformers 5 rebuilds a tokenizer from its class (LlamaTokenizer: Metaspace
// pre-tokenizer, no unk_token), this does the same, so ids equal AutoTokenizer's.
// A model directory with only tokenizer.model is read with libsentencepiece. Components this
// does not implement are an error naming them. Thread-safe after construction.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace csaq::storage {

class Tokenizer {
 public:
  // Reads <dir>/tokenizer.json (+ tokenizer_config.json), or <dir>/tokenizer.model.
  static Tokenizer load(const std::string& dir);
  // From tokenizer.json text (and optionally tokenizer_config.json text); `source` names them.
  static Tokenizer from_json(const std::string& tokenizer_json, const std::string& config_json,
                             const std::string& source);

  // Token ids of `text` (UTF-8; invalid sequences are an error naming the byte offset), with
  // BOS/EOS added when `add_special` and the tokenizer says so.
  std::vector<std::int64_t> encode(const std::string& text, bool add_special = true) const;
  // Text of `ids`; special tokens left out when `skip_special`.
  std::string decode(const std::vector<std::int64_t>& ids, bool skip_special = true) const;

  std::optional<std::int64_t> bos_id() const;
  std::optional<std::int64_t> eos_id() const;
  std::int64_t vocab_size() const;
  const std::string& source() const;

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
};

// The printable character byte-level BPE writes for byte `b` (GPT-2's mapping), UTF-8.
const std::string& byte_level_char(unsigned char b);

}  // namespace csaq::storage
