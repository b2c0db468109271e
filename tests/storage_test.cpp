#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "csaq/storage/error.h"
#include "csaq/storage/files.h"
#include "csaq/storage/h5.h"
#include "csaq/storage/npy.h"
#include "csaq/storage/safetensors.h"
#include "support.h"

namespace csaq::storage {
namespace {
using test::TempDir;

// Writes a raw safetensors file: header length, `header` text, then `data_bytes` zero bytes.
void write_raw(const std::string& path, const std::string& header, std::size_t data_bytes,
               std::int64_t claimed_len = -1) {
  std::ofstream out(path, std::ios::binary);
  const std::uint64_t len = claimed_len >= 0 ? static_cast<std::uint64_t>(claimed_len) : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>(len >> (8 * i)));
  out << header << std::string(data_bytes, '\0');
}

TEST(Safetensors, RoundTripKeepsValuesDtypesAndShapes) {
  TempDir dir;
  std::vector<NamedTensor> tensors = {
      {"a.f32", at::randn({3, 5})},
      {"b.bf16", at::randn({4}).to(at::kBFloat16)},
      {"c.f16", at::randn({2, 2, 3}).to(at::kHalf)},
      {"d.i64", at::arange(7, at::kLong)},
      {"e.u8", at::arange(5, at::kByte)},
      {"f.i32", at::tensor({-3, 4}, at::kInt)},
  };
  write_safetensors(dir / "x.safetensors", tensors, {{"note", "hi"}});
  auto file = SafetensorsFile::open(dir / "x.safetensors");
  EXPECT_EQ(file->metadata().at("format"), "pt");
  EXPECT_EQ(file->metadata().at("note"), "hi");
  for (const auto& [name, t] : tensors) {
    at::Tensor back = file->tensor(name);
    EXPECT_EQ(back.scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(at::equal(back, t)) << name;
  }
}

TEST(Safetensors, HeaderIsEightByteAlignedAndTensorsContiguous) {
  TempDir dir;
  write_safetensors(dir / "x.safetensors", {{"w", at::ones({3})}, {"v", at::ones({1}, at::kByte)}});
  std::ifstream in(dir / "x.safetensors", std::ios::binary);
  std::uint64_t len = 0;
  in.read(reinterpret_cast<char*>(&len), 8);
  EXPECT_EQ(len % 8, 0u);
  std::string header(len, ' ');
  in.read(header.data(), static_cast<std::streamsize>(len));
  auto j = nlohmann::json::parse(header);
  EXPECT_EQ(j["__metadata__"]["format"], "pt");
  EXPECT_EQ(j["w"]["data_offsets"], nlohmann::json({0, 12}));  // 4-byte elements first
  EXPECT_EQ(j["v"]["data_offsets"], nlohmann::json({12, 13}));
}

TEST(Safetensors, WrittenFilesFollowTheLayoutHuggingFaceValidates) {
  // safetensors' own reader rejects headers not starting with '{' and data sections with
  // gaps, overlaps or unindexed bytes: offsets sorted must tile [0, data size) exactly.
  TempDir dir;
  write_safetensors(dir / "x.safetensors", {{"c", at::ones({3}, at::kByte)}, {"a", at::ones({5}, at::kHalf)},
                                            {"b", at::ones({2, 3})}, {"d", at::ones({1}, at::kLong)}});
  std::ifstream in(dir / "x.safetensors", std::ios::binary);
  std::uint64_t len = 0;
  in.read(reinterpret_cast<char*>(&len), 8);
  std::string header(len, ' ');
  in.read(header.data(), static_cast<std::streamsize>(len));
  EXPECT_EQ(header.front(), '{');
  EXPECT_EQ(header.find_last_not_of(' '), header.rfind('}'));
  const std::string data((std::istreambuf_iterator<char>(in)), {});
  auto j = nlohmann::json::parse(header);
  std::vector<std::tuple<std::uint64_t, std::uint64_t, std::size_t>> spans;  // begin, end, element size
  for (const auto& [name, e] : j.items())
    if (name != "__metadata__") spans.emplace_back(e["data_offsets"][0], e["data_offsets"][1], dtype_size(e["dtype"]));
  std::sort(spans.begin(), spans.end());
  std::uint64_t expect = 0;
  for (const auto& [b, e, elem] : spans) {
    EXPECT_EQ(b, expect);
    expect = e;
    EXPECT_EQ(b % elem, 0u) << "larger elements first keeps every tensor aligned to its dtype";
  }
  EXPECT_EQ(expect, data.size());
}

TEST(Safetensors, RefusesToOverwriteUnlessAsked) {
  TempDir dir;
  write_safetensors(dir / "x.safetensors", {{"w", at::zeros({2})}});
  EXPECT_CSAQ_ERROR(write_safetensors(dir / "x.safetensors", {{"w", at::ones({2})}}), "already exists",
                    "--overwrite");
  EXPECT_TRUE(at::equal(SafetensorsFile::open(dir / "x.safetensors")->tensor("w"), at::zeros({2})));
  write_safetensors(dir / "x.safetensors", {{"w", at::ones({2})}}, {}, /*overwrite=*/true);
  EXPECT_TRUE(at::equal(SafetensorsFile::open(dir / "x.safetensors")->tensor("w"), at::ones({2})));
}

TEST(Safetensors, ShardedWriteSplitsAndReaderFindsEveryTensor) {
  TempDir dir;
  std::vector<NamedTensor> tensors;
  for (int i = 0; i < 5; ++i) tensors.emplace_back("t" + std::to_string(i), at::full({100}, float(i)));
  auto files = write_safetensors_sharded(dir.path(), tensors, /*max_shard_bytes=*/850);
  ASSERT_EQ(files.size(), 4u);  // 3 shards of at most two 400-byte tensors + the index
  EXPECT_NE(files[0].find("model-00001-of-00003.safetensors"), std::string::npos);
  auto reader = SafetensorsReader::open(dir.path());
  EXPECT_EQ(reader.names().size(), 5u);
  for (const auto& [name, t] : tensors) EXPECT_TRUE(at::equal(reader.load(name), t)) << name;
  EXPECT_NE(reader.file_of("t4").find("model-00003-of-00003"), std::string::npos);
}

TEST(Safetensors, SingleShardIsPlainModelSafetensors) {
  TempDir dir;
  auto files = write_safetensors_sharded(dir.path(), {{"w", at::ones({4})}}, 1 << 20);
  ASSERT_EQ(files.size(), 1u);
  EXPECT_TRUE(at::equal(SafetensorsReader::open(dir.path()).load("w"), at::ones({4})));
}

TEST(SafetensorsErrors, TruncatedFileNamesTheFile) {
  TempDir dir;
  std::ofstream(dir / "t.safetensors") << "abc";
  EXPECT_CSAQ_ERROR(SafetensorsFile::open(dir / "t.safetensors"), "t.safetensors", "truncated");
}

TEST(SafetensorsErrors, HeaderLengthPastTheEnd) {
  TempDir dir;
  write_raw(dir / "h.safetensors", "{}", 0, /*claimed_len=*/1000);
  EXPECT_CSAQ_ERROR(SafetensorsFile::open(dir / "h.safetensors"), "h.safetensors",
                    "header length 1000 runs past the end");
}

TEST(SafetensorsErrors, MalformedJson) {
  TempDir dir;
  write_raw(dir / "j.safetensors", "{\"a\": [1, 2", 0);
  EXPECT_CSAQ_ERROR(SafetensorsFile::open(dir / "j.safetensors"), "j.safetensors", "malformed JSON");
}

TEST(SafetensorsErrors, OffsetsOutOfRange) {
  TempDir dir;
  write_raw(dir / "o.safetensors", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
  EXPECT_CSAQ_ERROR(SafetensorsFile::open(dir / "o.safetensors"), "o.safetensors", "tensor 'w'",
                    "out of range");
}

TEST(SafetensorsErrors, OverlappingTensors) {
  TempDir dir;
  write_raw(dir / "v.safetensors",
            R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
            12);
  EXPECT_CSAQ_ERROR(SafetensorsFile::open(dir / "v.safetensors"), "v.safetensors", "'a' and 'b' overlap");
}

TEST(SafetensorsErrors, ByteCountMismatch) {
  TempDir dir;
  write_raw(dir / "b.safetensors", R"({"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}})", 8);
  EXPECT_CSAQ_ERROR(SafetensorsFile::open(dir / "b.safetensors"), "tensor 'w'", "byte count mismatch",
                    "needs 6 bytes");
}

TEST(SafetensorsErrors, ShapeWhoseElementCountOverflows) {
  TempDir dir;  // 2^96 elements: wraps to 0 in 64 bits, which would match the empty data
  write_raw(dir / "o.safetensors",
            R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,0]}})", 0);
  EXPECT_CSAQ_ERROR(SafetensorsFile::open(dir / "o.safetensors"), "tensor 'w'", "more elements than any file can hold");
}

TEST(SafetensorsErrors, UnknownDtype) {
  TempDir dir;
  write_raw(dir / "d.safetensors", R"({"w":{"dtype":"F8_E4M3X","shape":[1],"data_offsets":[0,1]}})", 1);
  EXPECT_CSAQ_ERROR(SafetensorsFile::open(dir / "d.safetensors"), "tensor 'w'", "unsupported dtype 'F8_E4M3X'");
}

TEST(SafetensorsErrors, TensorInIndexMissingFromItsFile) {
  TempDir dir;
  write_safetensors(dir / "part1.safetensors", {{"a", at::ones({2})}});
  std::ofstream(dir / "model.safetensors.index.json")
      << R"({"metadata":{},"weight_map":{"a":"part1.safetensors","b":"part1.safetensors"}})";
  auto reader = SafetensorsReader::open(dir.path());
  EXPECT_TRUE(at::equal(reader.load("a"), at::ones({2})));
  EXPECT_CSAQ_ERROR(reader.load("b"), "tensor 'b'", "model.safetensors.index.json", "missing from",
                    "part1.safetensors");
}

TEST(SafetensorsErrors, DirectoryWithoutWeights) {
  TempDir dir;
  EXPECT_CSAQ_ERROR(SafetensorsReader::open(dir.path()), dir.path(), "model.safetensors");
}

TEST(Npy, ReadsEveryTokenDtypeAndRejectsOthers) {
  TempDir dir;
  write_npy_tokens(dir / "t.npy", at::tensor({5, 0, 65535, 7}, at::kLong));
  EXPECT_TRUE(at::equal(read_npy_tokens(dir / "t.npy"), at::tensor({5, 0, 65535, 7}, at::kLong)));
  // Hand-made headers for the other dtypes: (descr, element bytes).
  for (auto [descr, item] : {std::pair<std::string, int>{"<u2", 2}, {"<u4", 4}, {"<i8", 8}, {"<f4", 4}}) {
    std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (3,), }";
    header.append(64 - (10 + header.size() + 1) % 64, ' ');
    header += '\n';
    std::ofstream out(dir / "x.npy", std::ios::binary);
    out << std::string("\x93NUMPY\x01\x00", 8) << char(header.size() & 0xff) << char(header.size() >> 8) << header;
    for (int v = 1; v <= 3; ++v) {
      const std::uint64_t value = static_cast<std::uint64_t>(v) * 1000;
      out.write(reinterpret_cast<const char*>(&value), item);  // little-endian host
    }
    out.close();
    if (descr == "<f4") {
      EXPECT_CSAQ_ERROR(read_npy_tokens(dir / "x.npy"), "x.npy", "unsupported dtype '<f4'");
    } else {
      EXPECT_TRUE(at::equal(read_npy_tokens(dir / "x.npy"), at::tensor({1000, 2000, 3000}, at::kLong))) << descr;
    }
  }
}

TEST(Npy, TruncatedDataAndBadMagicNameTheFile) {
  TempDir dir;
  write_npy_tokens(dir / "t.npy", at::arange(100, at::kLong));
  std::filesystem::resize_file(dir / "t.npy", std::filesystem::file_size(dir / "t.npy") - 8);
  EXPECT_CSAQ_ERROR(read_npy_tokens(dir / "t.npy"), "t.npy", "truncated");
  std::ofstream(dir / "bad.npy") << "not numpy at all";
  EXPECT_CSAQ_ERROR(read_npy_tokens(dir / "bad.npy"), "bad.npy", "bad magic");
}

TEST(Npy, ReadsTheSharedTokenFiles) {
  CSAQ_REQUIRE_SHARED(calib, "data/tinystories-calib.npy");
  at::Tensor t = read_npy_tokens(calib);
  EXPECT_EQ(t.numel(), 39653);  // data/README.md
  EXPECT_EQ(t[0].item<std::int64_t>(), 1);  // BOS
}

TEST(AtomicFile, UncommittedWriteLeavesNothing) {
  TempDir dir;
  {
    AtomicFile f(dir / "out.txt", false);
    f.write("partial");
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "out.txt"));
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}


// What a file holds, for checking that a refusal left it alone.
std::string contents(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

TEST(AtomicFile, ATargetThatAppearsWhileWritingIsKeptAndTemporaryNamesDiffer) {
  TempDir dir;
  AtomicFile a(dir / "out.txt", false), b(dir / "out.txt", false);  // two runs, one target
  a.write("first");
  b.write("second");
  std::size_t temporaries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) temporaries += e.path().filename() != "out.txt";
  EXPECT_EQ(temporaries, 2u) << "each writer has its own temporary file";
  a.commit();
  EXPECT_CSAQ_ERROR(b.commit(), "appeared while csaq was writing it");
  EXPECT_EQ(contents(dir / "out.txt"), "first");
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path()), {}), 1) << "no temporary left";
  // With overwrite the later one wins.
  AtomicFile c(dir / "out.txt", true);
  c.write("third");
  c.commit();
  EXPECT_EQ(contents(dir / "out.txt"), "third");
}

TEST(AtomicFile, NothingButARegularFileIsEverReplaced) {
  TempDir dir;
  ASSERT_EQ(::mkfifo((dir / "fifo").c_str(), 0600), 0);
  std::filesystem::create_directory(dir / "sub");
  for (const char* name : {"fifo", "sub"}) {
    EXPECT_CSAQ_ERROR(AtomicFile(dir / name, true), "csaq writes regular files only");
    std::ofstream(dir / "tmp.txt") << "x";
    EXPECT_CSAQ_ERROR(durable_rename(dir / "tmp.txt", dir / name, /*replace=*/true), "is a");
  }
  EXPECT_TRUE(std::filesystem::is_fifo(dir / "fifo"));
  EXPECT_TRUE(std::filesystem::is_directory(dir / "sub"));
}

TEST(CheckOutputs, AnOutputThatIsAnInputOrAnotherOutputIsRefusedByInode) {
  TempDir dir;
  std::filesystem::create_directory(dir / "model");
  std::ofstream(dir / "model/config.json") << "{}";
  std::ofstream(dir / "data.txt") << "text";
  std::filesystem::create_hard_link(dir / "data.txt", dir / "alias.txt");  // another name, the same file
  const std::vector<NamedPath> inputs{{"--model", dir / "model"}, {"--data", dir / "data.txt"}};
  EXPECT_CSAQ_ERROR(check_outputs({{"--report", dir / "alias.txt"}}, inputs, true), "--report", "is the input --data");
  EXPECT_CSAQ_ERROR(check_outputs({{"--out", dir / "model/config.json"}}, inputs, true), "of the input --model");
  EXPECT_CSAQ_ERROR(check_outputs({{"--out", dir / "x.h5"}, {"--report", dir / "./x.h5"}}, inputs, true),
                    "--report and --out name the same file");
  EXPECT_CSAQ_ERROR(check_outputs({{"--report", dir / "missing/r.json"}}, inputs, true), "does not exist");
  EXPECT_CSAQ_ERROR(check_outputs({{"--report", dir / "data.txt"}}, {}, false), "--overwrite");
  check_outputs({{"--out", dir / "model/q.h5"}, {"--report", dir / "r.json"}}, inputs, false);  // fine
  EXPECT_EQ(contents(dir / "data.txt"), "text");
}

TEST(Files, AFifoOrADirectoryInPlaceOfAFileIsNamedNotOpened) {
  TempDir dir;
  ASSERT_EQ(::mkfifo((dir / "model.safetensors").c_str(), 0600), 0);
  std::filesystem::create_directory(dir / "config.json");
  EXPECT_CSAQ_ERROR(MappedFile(dir / "model.safetensors"), "model.safetensors' is a FIFO, not a regular file");
  EXPECT_CSAQ_ERROR(read_text_file(dir / "config.json"), "config.json' is a directory, not a regular file");
}

TEST(H5File, ADatasetWhoseBytesChangedIsNamedOnRead) {
  TempDir dir;
  const at::Tensor marker = at::arange(64, at::kByte) * 3 + 7;  // a pattern to find in the file
  {
    H5File f = H5File::create(dir / "f.h5", false);
    f.put("group/data", marker);
    f.put("other", at::ones({4}));
    nlohmann::json sums(f.written_checksums());
    f.put_text(H5File::kChecksums, sums.dump());
    f.close();
  }
  EXPECT_TRUE(at::equal(H5File::open_read(dir / "f.h5").read("group/data"), marker));
  std::string bytes = contents(dir / "f.h5");
  const std::string pattern(reinterpret_cast<const char*>(marker.data_ptr()), 64);
  const std::size_t at = bytes.find(pattern);
  ASSERT_NE(at, std::string::npos);
  bytes[at + 10] = static_cast<char>(bytes[at + 10] ^ 0x01);  // one flipped bit
  std::ofstream(dir / "f.h5", std::ios::binary | std::ios::trunc) << bytes;
  const H5File f = H5File::open_read(dir / "f.h5");
  EXPECT_CSAQ_ERROR(f.read("group/data"), "dataset 'group/data'", "is corrupted");
  EXPECT_TRUE(at::equal(f.read("other"), at::ones({4})));
}

}  // namespace
}  // namespace csaq::storage
