#include "csaq/storage/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <sstream>
#include <array>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "csaq/storage/error.h"
#include "csaq/storage/files.h"

namespace csaq::storage {
namespace {
using nlohmann::json;

// ---- UTF-8 ----

std::size_t utf8_length(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xe) return 3;
  if ((c >> 3) == 0x1e) return 4;
  return 0;
}

// Byte offsets where each character starts; throws on invalid UTF-8.
std::vector<std::size_t> char_starts(const std::string& s, const std::string& what) {
  std::vector<std::size_t> starts;
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_length(static_cast<unsigned char>(s[i]));
    bool ok = n > 0 && i + n <= s.size();
    for (std::size_t k = 1; ok && k < n; ++k) ok = (static_cast<unsigned char>(s[i + k]) >> 6) == 0x2;
    CSAQ_CHECK(ok, what, ": invalid UTF-8 at byte ", i);
    starts.push_back(i);
    i += n;
  }
  return starts;
}

std::string utf8(std::uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
  return out;
}

// GPT-2's reversible byte -> printable character map used by byte-level BPE.
const std::array<std::string, 256>& byte_chars() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
      t[b] = utf8(printable ? static_cast<std::uint32_t>(b) : static_cast<std::uint32_t>(256 + extra++));
    }
    return t;
  }();
  return table;
}

std::string nfc(const std::string& s, const std::string& what) {
  UErrorCode err = U_ZERO_ERROR;
  const UNormalizer2* norm = unorm2_getNFCInstance(&err);
  std::vector<UChar> wide(s.size() + 1);
  int32_t wide_len = 0;
  u_strFromUTF8(wide.data(), static_cast<int32_t>(wide.size()), &wide_len, s.data(), static_cast<int32_t>(s.size()), &err);
  std::vector<UChar> out(static_cast<std::size_t>(wide_len) * 3 + 16);
  const int32_t out_len = unorm2_normalize(norm, wide.data(), wide_len, out.data(), static_cast<int32_t>(out.size()), &err);
  std::string result(static_cast<std::size_t>(out_len) * 3 + 4, '\0');
  int32_t result_len = 0;
  u_strToUTF8(result.data(), static_cast<int32_t>(result.size()), &result_len, out.data(), out_len, &err);
  CSAQ_CHECK(U_SUCCESS(err), what, ": NFC normalization failed: ", u_errorName(err));
  result.resize(static_cast<std::size_t>(result_len));
  return result;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  std::size_t pos = 0, hit;
  while ((hit = s.find(from, pos)) != std::string::npos) {
    out.append(s, pos, hit - pos);
    out += to;
    pos = hit + from.size();
  }
  out.append(s, pos, std::string::npos);
  s.swap(out);
}

// ---- regex (PCRE2 with Unicode properties) ----

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int err = 0;
    PCRE2_SIZE offset = 0;
    code_.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                              &err, &offset, nullptr),
                pcre2_code_free);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      CSAQ_FAIL(where, ": cannot compile regex '", pattern, "' at offset ", offset, ": ", reinterpret_cast<char*>(msg));
    }
    pcre2_jit_compile(code_.get(), PCRE2_JIT_COMPLETE);  // optional speed-up
  }
  // [begin, end) byte ranges of successive non-empty matches.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(const std::string& s) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr), pcre2_match_data_free);
    std::vector<std::pair<std::size_t, std::size_t>> out;
    std::size_t start = 0;
    while (start < s.size()) {
      const int rc = pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), start,
                                 PCRE2_NO_UTF_CHECK, md.get(), nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      if (ov[1] == ov[0]) {  // empty match: step over one character
        start = ov[0] + std::max<std::size_t>(1, utf8_length(static_cast<unsigned char>(s[ov[0]])));
        continue;
      }
      out.emplace_back(ov[0], ov[1]);
      start = ov[1];
    }
    return out;
  }

 private:
  std::shared_ptr<pcre2_code> code_;
};

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string json_string(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content")) return v["content"].get<std::string>();
  return {};
}

struct Step {  // one normalizer, pre-tokenizer or decoder step
  std::string type;
  json spec;
  std::shared_ptr<Regex> regex;
};

struct AddedToken {
  std::string content;
  std::int64_t id;
  bool special;
};

// Runs `command` with `input` on its standard input; returns its standard output.
std::string run_filter(const std::string& command, const std::string& input, const std::string& what) {
  char path[] = "/tmp/csaq-spm-XXXXXX";
  const int fd = ::mkstemp(path);
  CSAQ_CHECK(fd >= 0, what, ": cannot create a temporary file");
  const bool wrote = ::write(fd, input.data(), input.size()) == static_cast<ssize_t>(input.size());
  ::close(fd);
  std::string out;
  int status = -1;
  if (wrote) {
    FILE* pipe = ::popen((command + " < " + path).c_str(), "r");
    if (pipe != nullptr) {
      char buf[65536];
      std::size_t n;
      while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
      status = ::pclose(pipe);
    }
  }
  ::unlink(path);
  CSAQ_CHECK(wrote && status == 0, what, ": '", command, "' failed (is Debian's sentencepiece package installed?)");
  return out;
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

}  // namespace

struct Tokenizer::Impl {
  std::string source;
  // SentencePiece model (tokenizer.model only), run through Debian's spm_encode/spm_decode:
  // libsentencepiece carries protobuf-lite, whose symbols clash with the full protobuf that
  // LibTorch loads, so the two cannot share a process.
  std::string sp_model;
  std::int64_t sp_pieces = 0;
  // tokenizer.json
  std::vector<Step> normalizers, pre_tokenizers, decoders;
  std::unordered_map<std::string, std::int64_t> vocab;
  std::vector<std::string> id_to_token;
  std::map<std::pair<std::int64_t, std::int64_t>, std::pair<std::int64_t, std::int64_t>> merges;  // -> rank, new id
  std::optional<std::int64_t> unk;
  bool byte_fallback = false, fuse_unk = false, ignore_merges = false;
  std::vector<AddedToken> added;  // longest first
  std::vector<bool> is_special;
  std::optional<std::int64_t> bos, eos;
  bool add_bos = false, add_eos = false;

  std::int64_t id_of(const std::string& token, const std::string& what) const {
    auto it = vocab.find(token);
    CSAQ_CHECK(it != vocab.end(), source, ": ", what, " '", token, "' is not in the vocabulary");
    return it->second;
  }

  std::string normalize(std::string s) const {
    for (const Step& n : normalizers) {
      if (n.type == "Prepend") {
        if (!s.empty()) s = n.spec["prepend"].get<std::string>() + s;
      } else if (n.type == "Replace") {
        replace_all(s, n.spec["pattern"]["String"].get<std::string>(), n.spec["content"].get<std::string>());
      } else if (n.type == "NFC") {
        s = nfc(s, source);
      }
    }
    return s;
  }

  // Pieces of one non-added segment after the pre-tokenizers; `first`: the text's first segment.
  std::vector<std::string> pre_tokenize(const std::string& s, bool first) const {
    std::vector<std::string> pieces{s};
    for (const Step& p : pre_tokenizers) {
      std::vector<std::string> next;
      for (const std::string& piece : pieces) {
        if (p.type == "Split") {
          const bool removed = p.spec["behavior"] == "Removed";
          std::size_t pos = 0;
          for (const auto& [b, e] : p.regex->find_all(piece)) {
            if (b > pos) next.push_back(piece.substr(pos, b - pos));
            if (!removed) next.push_back(piece.substr(b, e - b));
            pos = e;
          }
          if (pos < piece.size()) next.push_back(piece.substr(pos));
        } else if (p.type == "ByteLevel") {
          std::string text = piece;
          if (p.spec.value("add_prefix_space", false) && (text.empty() || text[0] != ' ')) text = " " + text;
          std::vector<std::string> parts;
          if (p.regex) {
            for (const auto& [b, e] : p.regex->find_all(text)) parts.push_back(text.substr(b, e - b));
          } else {
            parts.push_back(text);
          }
          for (const std::string& part : parts) {
            std::string mapped;
            for (unsigned char c : part) mapped += byte_chars()[c];
            next.push_back(mapped);
          }
        } else if (p.type == "Metaspace") {
          const std::string rep = p.spec.value("replacement", std::string("\u2581"));
          std::string text = piece;
          replace_all(text, " ", rep);
          const std::string scheme = p.spec.value("prepend_scheme", p.spec.value("add_prefix_space", true) ? "always" : "never");
          if ((scheme == "always" || (scheme == "first" && first)) && text.rfind(rep, 0) != 0) text = rep + text;
          if (!p.spec.value("split", true)) {
            next.push_back(text);
            continue;
          }
          std::size_t pos = 0, hit;
          while ((hit = text.find(rep, pos + 1)) != std::string::npos) {  // each piece starts with rep
            next.push_back(text.substr(pos, hit - pos));
            pos = hit;
          }
          if (pos < text.size()) next.push_back(text.substr(pos));
        }
      }
      pieces.swap(next);
    }
    return pieces;
  }

  // BPE of one piece: characters (or byte-fallback tokens) merged lowest rank first, leftmost
  // first among equal ranks, with a heap over the live pairs (as Hugging Face tokenizers).
  void bpe(const std::string& piece, std::vector<std::int64_t>& out) const {
    if (piece.empty()) return;
    if (ignore_merges) {
      auto it = vocab.find(piece);
      if (it != vocab.end()) {
        out.push_back(it->second);
        return;
      }
    }
    std::vector<std::int64_t> ids;
    const std::vector<std::size_t> starts = char_starts(piece, source + " input");
    for (std::size_t c = 0; c < starts.size(); ++c) {
      const std::size_t end = c + 1 < starts.size() ? starts[c + 1] : piece.size();
      const std::string ch = piece.substr(starts[c], end - starts[c]);
      auto it = vocab.find(ch);
      if (it != vocab.end()) {
        ids.push_back(it->second);
        continue;
      }
      bool bytes_ok = byte_fallback;
      std::vector<std::int64_t> bytes;
      for (unsigned char b : ch) {
        char name[8];
        std::snprintf(name, sizeof(name), "<0x%02X>", b);
        auto bt = vocab.find(name);
        if (bt == vocab.end()) bytes_ok = false;
        else bytes.push_back(bt->second);
      }
      if (bytes_ok) {
        ids.insert(ids.end(), bytes.begin(), bytes.end());
      } else if (unk) {
        if (!(fuse_unk && !ids.empty() && ids.back() == *unk)) ids.push_back(*unk);
      }  // no unk_token: the character is dropped, as Hugging Face's BPE does
    }
    const std::size_t n = ids.size();
    std::vector<std::int64_t> prev(n), next(n);
    std::vector<char> alive(n, 1);
    for (std::size_t i = 0; i < n; ++i) {
      prev[i] = static_cast<std::int64_t>(i) - 1;
      next[i] = i + 1 < n ? static_cast<std::int64_t>(i + 1) : -1;
    }
    using Entry = std::tuple<std::int64_t, std::int64_t, std::int64_t>;  // rank, position, new id
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    auto push = [&](std::int64_t pos) {
      if (pos < 0 || next[pos] < 0) return;
      auto it = merges.find({ids[pos], ids[next[pos]]});
      if (it != merges.end()) heap.emplace(it->second.first, pos, it->second.second);
    };
    for (std::size_t i = 0; i + 1 < n; ++i) push(static_cast<std::int64_t>(i));
    while (!heap.empty()) {
      const auto [rank, pos, new_id] = heap.top();
      heap.pop();
      if (!alive[pos] || next[pos] < 0) continue;
      auto it = merges.find({ids[pos], ids[next[pos]]});
      if (it == merges.end() || it->second != std::make_pair(rank, new_id)) continue;  // stale
      const std::int64_t right = next[pos];
      ids[pos] = new_id;
      alive[right] = 0;
      next[pos] = next[right];
      if (next[right] >= 0) prev[next[right]] = pos;
      push(prev[pos]);
      push(pos);
    }
    for (std::size_t i = 0; i < n; ++i)
      if (alive[i]) out.push_back(ids[i]);
  }
};

namespace {

std::vector<Step> steps(const json& spec, const std::string& kind, const std::vector<std::string>& supported,
                        const std::string& source) {
  std::vector<Step> out;
  if (spec.is_null()) return out;
  const std::string type = spec.value("type", std::string());
  if (type == "Sequence") {
    const char* key = kind == "normalizer" ? "normalizers" : kind == "pre_tokenizer" ? "pretokenizers" : "decoders";
    for (const auto& s : spec[key]) {
      auto more = steps(s, kind, supported, source);
      out.insert(out.end(), more.begin(), more.end());
    }
    return out;
  }
  std::string list;
  for (const auto& s : supported) list += (list.empty() ? "" : ", ") + s;
  CSAQ_CHECK(std::find(supported.begin(), supported.end(), type) != supported.end(), source, ": unsupported ", kind,
             " type '", type, "' (supported: ", list, ")");
  Step step{type, spec, nullptr};
  if (kind == "normalizer" && type == "Replace")
    CSAQ_CHECK(spec["pattern"].contains("String"), source, ": Replace normalizer with a regex pattern is not supported");
  if (kind == "pre_tokenizer" && type == "Split") {
    CSAQ_CHECK(!spec.value("invert", false), source, ": inverted Split pre-tokenizer is not supported");
    const std::string behavior = spec.value("behavior", std::string());
    CSAQ_CHECK(behavior == "Isolated" || behavior == "Removed", source, ": Split behavior '", behavior,
               "' is not supported (Isolated, Removed)");
    const json& p = spec["pattern"];
    if (p.contains("Regex")) {
      step.regex = std::make_shared<Regex>(p["Regex"].get<std::string>(), source);
    } else {
      std::string escaped;  // a literal string as a regex
      for (char c : p["String"].get<std::string>()) {
        if (std::string("\\^$.|?*+()[]{}").find(c) != std::string::npos) escaped += '\\';
        escaped += c;
      }
      step.regex = std::make_shared<Regex>(escaped, source);
    }
  }
  if (kind == "pre_tokenizer" && type == "ByteLevel" && spec.value("use_regex", true))
    step.regex = std::make_shared<Regex>(kGpt2Pattern, source);
  out.push_back(step);
  return out;
}

}  // namespace

Tokenizer Tokenizer::from_json(const std::string& tokenizer_json, const std::string& config_json,
                               const std::string& source) try {
  auto impl = std::make_shared<Impl>();
  impl->source = source;
  json t, cfg = json::object();
  try {
    t = json::parse(tokenizer_json);
    if (!config_json.empty()) cfg = json::parse(config_json);
  } catch (const json::exception& e) {
    CSAQ_FAIL(source, ": malformed JSON: ", e.what());
  }
  const json& m = t["model"];
  CSAQ_CHECK(m.is_object() && m.value("type", std::string("BPE")) == "BPE", source, ": unsupported tokenizer model '",
             m.is_object() ? m.value("type", std::string()) : std::string("?"), "' (supported: BPE)");
  CSAQ_CHECK(m["continuing_subword_prefix"].is_null() && m["end_of_word_suffix"].is_null(), source,
             ": BPE with continuing_subword_prefix or end_of_word_suffix is not supported");
  CSAQ_CHECK(m["dropout"].is_null() || m["dropout"].get<double>() == 0.0, source, ": BPE dropout is not supported");
  for (const auto& [tok, id] : m["vocab"].items()) impl->vocab[tok] = id.get<std::int64_t>();
  for (const auto& a : t.value("added_tokens", json::array())) {
    const auto id = a["id"].get<std::int64_t>();
    impl->vocab[a["content"].get<std::string>()] = id;
    impl->added.push_back({a["content"].get<std::string>(), id, a.value("special", false)});
  }
  std::sort(impl->added.begin(), impl->added.end(),
            [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  std::int64_t size = 0;
  for (const auto& [tok, id] : impl->vocab) size = std::max(size, id + 1);
  impl->id_to_token.assign(static_cast<std::size_t>(size), std::string());
  impl->is_special.assign(static_cast<std::size_t>(size), false);
  for (const auto& [tok, id] : impl->vocab) impl->id_to_token[id] = tok;
  for (const auto& a : impl->added) impl->is_special[a.id] = a.special;
  std::int64_t rank = 0;
  for (const auto& mg : m["merges"]) {
    std::string a, b;
    if (mg.is_string()) {
      const std::string s = mg.get<std::string>();
      const std::size_t space = s.find(' ');
      CSAQ_CHECK(space != std::string::npos, source, ": malformed merge '", s, "'");
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else {
      a = mg[0].get<std::string>();
      b = mg[1].get<std::string>();
    }
    impl->merges[{impl->id_of(a, "merge part"), impl->id_of(b, "merge part")}] = {rank++, impl->id_of(a + b, "merge result")};
  }
  if (m.contains("unk_token") && m["unk_token"].is_string()) impl->unk = impl->id_of(m["unk_token"], "unk_token");
  impl->byte_fallback = m.value("byte_fallback", false);
  impl->fuse_unk = m.value("fuse_unk", false);
  impl->ignore_merges = m.value("ignore_merges", false);
  impl->normalizers = steps(t["normalizer"], "normalizer", {"Prepend", "Replace", "NFC"}, source);
  impl->pre_tokenizers = steps(t["pre_tokenizer"], "pre_tokenizer", {"Split", "ByteLevel", "Metaspace"}, source);
  impl->decoders = steps(t["decoder"], "decoder", {"Replace", "ByteFallback", "Fuse", "Strip", "ByteLevel", "Metaspace"}, source);
  // transformers >= 5 does not run a Llama-class tokenizer.json as written: LlamaTokenizer
  // rebuilds it from the vocabulary and merges with no normalizer, a Metaspace pre-tokenizer
  // that adds "▁" only where the text does not start with one ("first" unless legacy), and a
  // BPE without unk_token (characters byte fallback cannot cover are dropped). Follow it, so
  // that ids match what users get from AutoTokenizer.
  const std::string cls = cfg.value("tokenizer_class", std::string());
  if ((cls == "LlamaTokenizer" || cls == "LlamaTokenizerFast") && impl->byte_fallback) {
    const bool prefix = cfg.value("add_prefix_space", true);
    const bool legacy = cfg.contains("legacy") && cfg["legacy"].is_boolean() ? cfg["legacy"].get<bool>() : false;
    impl->normalizers.clear();
    impl->pre_tokenizers = {Step{"Metaspace",
                                 {{"replacement", "\u2581"},
                                  {"prepend_scheme", prefix ? (legacy ? "always" : "first") : "never"},
                                  {"split", false}},
                                 nullptr}};
    impl->unk.reset();
    impl->fuse_unk = true;
    impl->decoders = {Step{"Replace", {{"pattern", {{"String", "\u2581"}}}, {"content", " "}}, nullptr},
                      Step{"ByteFallback", json::object(), nullptr}, Step{"Fuse", json::object(), nullptr}};
    if (prefix) impl->decoders.push_back(Step{"Strip", {{"content", " "}, {"start", 1}, {"stop", 0}}, nullptr});
  }

  // BOS/EOS: tokenizer_config.json first, else the post-processor's template.
  std::vector<std::string> before, after;
  std::vector<json> processors;
  const json& post = t["post_processor"];
  if (post.is_object()) {
    if (post.value("type", std::string()) == "Sequence") {
      for (const auto& p : post["processors"]) processors.push_back(p);
    } else {
      processors.push_back(post);
    }
  }
  for (const auto& p : processors) {
    const std::string type = p.value("type", std::string());
    CSAQ_CHECK(type == "TemplateProcessing" || type == "ByteLevel", source, ": unsupported post_processor '", type,
               "' (supported: TemplateProcessing, ByteLevel)");
    if (type != "TemplateProcessing") continue;
    bool seen_sequence = false;
    for (const auto& item : p["single"]) {
      if (item.contains("Sequence")) seen_sequence = true;
      else if (item.contains("SpecialToken")) (seen_sequence ? after : before).push_back(item["SpecialToken"]["id"]);
    }
  }
  const std::string bos_text = cfg.contains("bos_token") ? json_string(cfg["bos_token"]) : (before.empty() ? "" : before[0]);
  const std::string eos_text = cfg.contains("eos_token") ? json_string(cfg["eos_token"]) : (after.empty() ? "" : after[0]);
  if (!bos_text.empty()) impl->bos = impl->id_of(bos_text, "bos_token");
  if (!eos_text.empty()) impl->eos = impl->id_of(eos_text, "eos_token");
  impl->add_bos = cfg.contains("add_bos_token") ? cfg["add_bos_token"].get<bool>() : !before.empty();
  impl->add_eos = cfg.contains("add_eos_token") ? cfg["add_eos_token"].get<bool>() : !after.empty();
  CSAQ_CHECK(!impl->add_bos || impl->bos, source, ": add_bos_token is set but there is no bos_token");
  CSAQ_CHECK(!impl->add_eos || impl->eos, source, ": add_eos_token is set but there is no eos_token");
  Tokenizer tok;
  tok.impl_ = impl;
  return tok;
} catch (const json::exception& e) {  // a key of the wrong type or shape, wherever it is read
  CSAQ_FAIL(source, " (or its tokenizer_config.json): unexpected value: ", e.what());
}

Tokenizer Tokenizer::load(const std::string& dir) try {
  namespace fs = std::filesystem;
  const fs::path d(dir);
  std::string config;
  if (fs::exists(d / "tokenizer_config.json")) config = read_text_file((d / "tokenizer_config.json").string());
  if (fs::exists(d / "tokenizer.json"))
    return from_json(read_text_file((d / "tokenizer.json").string()), config, (d / "tokenizer.json").string());
  const std::string model = (d / "tokenizer.model").string();
  CSAQ_CHECK(fs::exists(model), "'", dir, "' has neither tokenizer.json nor tokenizer.model");
  auto impl = std::make_shared<Impl>();
  impl->source = model;
  impl->sp_model = model;
  // Piece ids of the special pieces, and the vocabulary size, from the model itself.
  const std::string vocab = run_filter("spm_export_vocab --model=" + shell_quote(model), "", model);
  std::istringstream lines(vocab);
  std::string line;
  while (std::getline(lines, line)) {
    const std::string piece = line.substr(0, line.find('\t'));
    if (piece == "<s>") impl->bos = impl->sp_pieces;
    if (piece == "</s>") impl->eos = impl->sp_pieces;
    ++impl->sp_pieces;
  }
  const json cfg = config.empty() ? json::object() : json::parse(config);
  impl->add_bos = cfg.value("add_bos_token", impl->bos.has_value());  // LlamaTokenizer's default
  impl->add_eos = cfg.value("add_eos_token", false);
  Tokenizer tok;
  tok.impl_ = impl;
  return tok;
} catch (const json::exception& e) {
  CSAQ_FAIL("tokenizer_config.json of '", dir, "': unexpected value: ", e.what());
}

std::vector<std::int64_t> Tokenizer::encode(const std::string& text, bool add_special) const {
  const Impl& t = *impl_;
  std::vector<std::int64_t> out;
  if (add_special && t.add_bos) out.push_back(*t.bos);
  if (!t.sp_model.empty()) {
    char_starts(text, "text for " + t.source);
    // One line per input line: encode line by line and rejoin newlines the way the model
    // sees them would need the raw API; spm_encode treats each line as a sentence.
    std::istringstream ids(run_filter("spm_encode --output_format=id --model=" + shell_quote(t.sp_model), text, t.source));
    std::int64_t id;
    while (ids >> id) out.push_back(id);
  } else {
    const std::vector<std::size_t> starts = char_starts(text, "text for " + t.source);
    // Added tokens are matched in the raw text, leftmost and then longest first.
    std::size_t seg = 0;
    bool first = true;
    auto flush = [&](std::size_t end) {
      if (end > seg) {
        for (const auto& piece : t.pre_tokenize(t.normalize(text.substr(seg, end - seg)), first)) t.bpe(piece, out);
        first = false;
      }
    };
    for (std::size_t c = 0; c < starts.size(); ++c) {
      const std::size_t pos = starts[c];
      if (pos < seg) continue;
      for (const AddedToken& a : t.added) {
        if (text.compare(pos, a.content.size(), a.content) == 0) {
          flush(pos);
          out.push_back(a.id);
          seg = pos + a.content.size();
          first = false;
          break;
        }
      }
    }
    flush(text.size());
  }
  if (add_special && t.add_eos) out.push_back(*t.eos);
  return out;
}

std::string Tokenizer::decode(const std::vector<std::int64_t>& ids, bool skip_special) const {
  const Impl& t = *impl_;
  std::vector<std::int64_t> kept;
  for (auto id : ids) {
    CSAQ_CHECK(id >= 0 && id < vocab_size(), t.source, ": token id ", id, " is outside the vocabulary");
    const bool special = !t.sp_model.empty() ? (id == t.bos.value_or(-1) || id == t.eos.value_or(-1)) : t.is_special[id];
    if (!(skip_special && special)) kept.push_back(id);
  }
  if (!t.sp_model.empty()) {
    std::string line;
    for (auto id : kept) line += std::to_string(id) + " ";
    std::string text = run_filter("spm_decode --input_format=id --model=" + shell_quote(t.sp_model), line + "\n", t.source);
    if (!text.empty() && text.back() == '\n') text.pop_back();
    return text;
  }
  std::vector<std::string> tokens;
  for (auto id : kept) tokens.push_back(t.id_to_token[id]);
  for (const Step& d : t.decoders) {
    if (d.type == "Replace") {
      for (auto& s : tokens) replace_all(s, d.spec["pattern"]["String"].get<std::string>(), d.spec["content"].get<std::string>());
    } else if (d.type == "ByteFallback") {
      std::vector<std::string> next;
      std::string bytes;
      auto flush = [&] {
        if (bytes.empty()) return;
        try {
          char_starts(bytes, "bytes");
          next.push_back(bytes);
        } catch (const Error&) {
          for (std::size_t i = 0; i < bytes.size(); ++i) next.push_back("\xEF\xBF\xBD");  // U+FFFD per byte
        }
        bytes.clear();
      };
      for (const auto& s : tokens) {
        if (s.size() == 6 && s.rfind("<0x", 0) == 0 && s[5] == '>') {
          bytes += static_cast<char>(std::stoi(s.substr(3, 2), nullptr, 16));
        } else {
          flush();
          next.push_back(s);
        }
      }
      flush();
      tokens.swap(next);
    } else if (d.type == "Fuse") {
      std::string all;
      for (const auto& s : tokens) all += s;
      tokens = {all};
    } else if (d.type == "Strip") {
      const std::string c = d.spec["content"].get<std::string>();
      const int start = d.spec.value("start", 0), stop = d.spec.value("stop", 0);
      for (auto& s : tokens) {
        for (int i = 0; i < start && s.rfind(c, 0) == 0; ++i) s.erase(0, c.size());
        for (int i = 0; i < stop && s.size() >= c.size() && s.compare(s.size() - c.size(), c.size(), c) == 0; ++i)
          s.erase(s.size() - c.size());
      }
    } else if (d.type == "ByteLevel") {
      static const std::unordered_map<std::string, char> back = [] {
        std::unordered_map<std::string, char> m;
        for (int b = 0; b < 256; ++b) m[byte_chars()[b]] = static_cast<char>(b);
        return m;
      }();
      std::string all;
      for (const auto& s : tokens) all += s;
      std::string bytes;
      const auto starts = char_starts(all, "decoded tokens");
      for (std::size_t c = 0; c < starts.size(); ++c) {
        const std::size_t end = c + 1 < starts.size() ? starts[c + 1] : all.size();
        const std::string ch = all.substr(starts[c], end - starts[c]);
        auto it = back.find(ch);
        bytes += it != back.end() ? std::string(1, it->second) : ch;
      }
      tokens = {bytes};
    } else if (d.type == "Metaspace") {
      const std::string rep = d.spec.value("replacement", std::string("\u2581"));
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        replace_all(tokens[i], rep, " ");
        if (i == 0 && d.spec.value("prepend_scheme", std::string("always")) != "never" && tokens[i].rfind(' ', 0) == 0)
          tokens[i].erase(0, 1);
      }
    }
  }
  std::string out;
  for (const auto& s : tokens) out += s;
  return out;
}

const std::string& byte_level_char(unsigned char b) { return byte_chars()[b]; }

std::optional<std::int64_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<std::int64_t> Tokenizer::eos_id() const { return impl_->eos; }
std::int64_t Tokenizer::vocab_size() const {
  return !impl_->sp_model.empty() ? impl_->sp_pieces : static_cast<std::int64_t>(impl_->id_to_token.size());
}
const std::string& Tokenizer::source() const { return impl_->source; }

}  // namespace csaq::storage
