// Tokenizers against ids made by Hugging Face tokenizers, and by hand.
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "csaq/storage/error.h"
#include "csaq/storage/files.h"
#include "csaq/storage/npy.h"
#include "csaq/storage/tokenizer.h"
#include "support.h"

namespace csaq::storage {
namespace {

std::vector<std::int64_t> ids_of(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return {c.data_ptr<std::int64_t>(), c.data_ptr<std::int64_t>() + c.numel()};
}

// Byte offset of character `n` of UTF-8 text.
std::size_t byte_of_char(const std::string& s, std::size_t n) {
  std::size_t chars = 0;
  for (std::size_t i = 0; i < s.size(); ++i)
    if ((static_cast<unsigned char>(s[i]) & 0xc0) != 0x80 && chars++ == n) return i;
  return s.size();
}

TEST(Tokenizer, TinyStoriesIdsEqualHuggingFaceOnTheCalibrationAndHeldOutSplit) {
  CSAQ_REQUIRE_SHARED(model_dir, "models/tinystories-656k");
  CSAQ_REQUIRE_SHARED(text_path, "data/tinystories-train-sample.txt");
  const Tokenizer tok = Tokenizer::load(model_dir);
  const std::string text = read_text_file(text_path);
  // data/README.md: split by characters at 80%, each part tokenized with its BOS.
  std::size_t chars = 0;
  for (unsigned char c : text) chars += (c & 0xc0) != 0x80;
  const std::size_t cut = byte_of_char(text, static_cast<std::size_t>(0.8 * static_cast<double>(chars)));
  const auto calib = tok.encode(text.substr(0, cut));
  const auto heldout = tok.encode(text.substr(cut));
  EXPECT_EQ(calib, ids_of(read_npy_tokens(test::shared_path("data/tinystories-calib.npy"))));
  EXPECT_EQ(heldout, ids_of(read_npy_tokens(test::shared_path("data/tinystories-heldout.npy"))));
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  // Decoding gives the text back (the BOS is skipped; like transformers, the Strip decoder
  // drops one leading space, and characters outside the vocabulary were dropped).
  const std::string ascii = text.substr(0, 5000);
  EXPECT_EQ(tok.decode(tok.encode(ascii)), ascii);
  EXPECT_EQ(tok.decode(heldout).substr(0, 100), text.substr(cut + 1, 100));
}

TEST(Tokenizer, ByteFallbackSpecialTokensAndEmptyInput) {
  CSAQ_REQUIRE_SHARED(model_dir, "models/tinystories-656k");
  const Tokenizer tok = Tokenizer::load(model_dir);
  EXPECT_EQ(tok.encode(""), std::vector<std::int64_t>{1});
  EXPECT_TRUE(tok.encode("", false).empty());
  // This vocabulary has no <0xNN> byte tokens: a character outside it is dropped.
  EXPECT_EQ(tok.encode("a\u2603b", false), tok.encode("ab", false));
  // Special tokens in the text are matched whole.
  const auto ids = tok.encode("Hi<|end_story|>", false);
  EXPECT_EQ(ids.back(), 2);
  EXPECT_EQ(tok.decode(ids, /*skip_special=*/false).find("<|end_story|>") != std::string::npos, true);
  EXPECT_CSAQ_ERROR(tok.encode(std::string("ok \xff bad")), "invalid UTF-8 at byte 3");
}

// A byte-level BPE (GPT-2 style) tokenizer.json small enough to check by hand.
std::string tiny_byte_level() {
  nlohmann::json vocab = nlohmann::json::object();
  // Byte-level alphabet for the characters used: 'a'..'e', 'h', 'l', 'o', ' ' -> 'Ġ', '!'.
  const std::vector<std::string> base = {"a", "b", "c", "d", "e", "h", "l", "o", "\u0120", "!"};
  for (std::size_t i = 0; i < base.size(); ++i) vocab[base[i]] = i;  // ids 0..9
  vocab["he"] = 10;
  vocab["ll"] = 11;
  vocab["hell"] = 12;
  vocab["hello"] = 13;
  vocab["\u0120h"] = 14;
  vocab["\u0120he"] = 15;
  nlohmann::json t = {
      {"version", "1.0"},
      {"added_tokens", {{{"id", 16}, {"content", "<|eot|>"}, {"special", true}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"post_processor", {{"type", "ByteLevel"}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"h e", "l l", "he ll", "hell o", "\u0120 h", "\u0120h e"}},
        {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr},
        {"dropout", nullptr}}},
  };
  return t.dump();
}

TEST(Tokenizer, ByteLevelBpeMatchesHandCheckedIds) {
  const std::string config = R"({"eos_token": "<|eot|>"})";
  const Tokenizer tok = Tokenizer::from_json(tiny_byte_level(), config, "tiny byte-level");
  // "hello hello!" -> pre-tokens "hello", " hello", "!" (GPT-2 regex), bytes mapped (' ' -> 'Ġ').
  // "hello": h e l l o -> (h e) -> he, (l l) -> ll, (he ll) -> hell, (hell o) -> hello = 13.
  // "Ġhello": Ġ h e l l o -> lowest rank first: h e (0) before Ġ h (4), then l l, he ll,
  //   hell o; "Ġ hello" is no merge, so [Ġ=8, hello=13] (left-to-right merging would give Ġhe).
  // "!" = 9.
  EXPECT_EQ(tok.encode("hello hello!"), (std::vector<std::int64_t>{13, 8, 13, 9}));
  EXPECT_EQ(tok.encode("hello<|eot|>"), (std::vector<std::int64_t>{13, 16}));
  EXPECT_FALSE(tok.bos_id().has_value());
  EXPECT_EQ(tok.eos_id(), 16);
  EXPECT_EQ(tok.decode({13, 8, 13, 9}), "hello hello!");
  EXPECT_EQ(tok.decode({13, 16}), "hello");
  EXPECT_EQ(tok.decode({13, 16}, false), "hello<|eot|>");
  EXPECT_TRUE(tok.encode("").empty());
  EXPECT_TRUE(tok.encode("x").empty());  // no unk_token: dropped, as Hugging Face's BPE does
  EXPECT_EQ(tok.encode("hexllo"), (std::vector<std::int64_t>{13}));  // the dropped 'x' leaves "hello"
}

TEST(Tokenizer, SentencePieceStyleByteFallbackAsTokenizerJsonSaysWithoutAClass) {
  // Metaspace normalizers, <0xNN> byte tokens and an unk_token, read as the file says.
  nlohmann::json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"\u2581", 3}, {"a", 4}, {"b", 5},
                          {"\u2581a", 6}, {"<0xE2>", 7}, {"<0x98>", 8}, {"<0x83>", 9}};
  nlohmann::json t = {
      {"added_tokens", {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
                        {{"id", 1}, {"content", "<s>"}, {"special", true}},
                        {{"id", 2}, {"content", "</s>"}, {"special", true}}}},
      {"normalizer", {{"type", "Sequence"}, {"normalizers", {{{"type", "Prepend"}, {"prepend", "\u2581"}},
                                                             {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}}}}}},
      {"pre_tokenizer", nullptr},
      {"post_processor", {{"type", "TemplateProcessing"}, {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                                                                       {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}}}},
      {"decoder", {{"type", "Sequence"}, {"decoders", {{{"type", "Replace"}, {"pattern", {{"String", "\u2581"}}}, {"content", " "}},
                                                        {{"type", "ByteFallback"}}, {{"type", "Fuse"}},
                                                        {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"\u2581 a"}}, {"unk_token", "<unk>"},
                 {"byte_fallback", true}, {"fuse_unk", true}, {"continuing_subword_prefix", nullptr},
                 {"end_of_word_suffix", nullptr}, {"dropout", nullptr}}},
  };
  const Tokenizer tok = Tokenizer::from_json(t.dump(), "", "sp-style");
  // "a ☃b" -> "▁a▁☃b": ▁a, ▁, the three bytes of ☃ (E2 98 83), b; BOS from the template.
  EXPECT_EQ(tok.encode("a \u2603b"), (std::vector<std::int64_t>{1, 6, 3, 7, 8, 9, 5}));
  EXPECT_EQ(tok.decode({1, 6, 3, 7, 8, 9, 5}), "a \u2603b");
  EXPECT_EQ(tok.encode("ac", false), (std::vector<std::int64_t>{6, 0}));  // 'c': no byte token -> unk
  EXPECT_EQ(tok.decode({6, 7}), "a\uFFFD");  // a lone byte of a multi-byte character
}

TEST(Tokenizer, SentencePieceModelWithoutTokenizerJsonIsRead) {
  CSAQ_REQUIRE_SHARED(text_path, "data/tinystories-train-sample.txt");
  test::TempDir dir;
  const std::string train = "spm_train --input=" + text_path + " --model_prefix=" + (dir / "tokenizer") +
                            " --vocab_size=300 --model_type=bpe --minloglevel=2 > /dev/null 2>&1";
  ASSERT_EQ(std::system(train.c_str()), 0) << "spm_train (Debian package sentencepiece) is needed";
  const Tokenizer tok = Tokenizer::load(dir.path());
  EXPECT_EQ(tok.vocab_size(), 300);
  EXPECT_EQ(tok.bos_id(), 1);  // SentencePiece's <s>
  const auto ids = tok.encode("Once upon a time, Lily found a ball.");
  ASSERT_GT(ids.size(), 3u);
  EXPECT_EQ(ids[0], 1);  // LlamaTokenizer adds BOS by default
  EXPECT_EQ(tok.decode(ids), "Once upon a time, Lily found a ball.");
  std::ofstream(dir / "tokenizer_config.json") << R"({"add_bos_token": false})";
  EXPECT_EQ(Tokenizer::load(dir.path()).encode("Once").front(), ids[1]);
}

TEST(Tokenizer, UnsupportedComponentsAreNamed) {
  auto t = nlohmann::json::parse(tiny_byte_level());
  t["model"]["type"] = "WordPiece";
  EXPECT_CSAQ_ERROR(Tokenizer::from_json(t.dump(), "", "wp.json"), "wp.json", "unsupported tokenizer model 'WordPiece'");
  t = nlohmann::json::parse(tiny_byte_level());
  t["pre_tokenizer"] = {{"type", "BertPreTokenizer"}};
  EXPECT_CSAQ_ERROR(Tokenizer::from_json(t.dump(), "", "b.json"), "unsupported pre_tokenizer type 'BertPreTokenizer'");
  EXPECT_CSAQ_ERROR(Tokenizer::load("/nonexistent"), "neither tokenizer.json nor tokenizer.model");
}

}  // namespace
}  // namespace csaq::storage
