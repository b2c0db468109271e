#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "csaq/shard/config.h"
#include "csaq/shard/model.h"
#include "csaq/shard/pipeline.h"
#include "csaq/storage/error.h"
#include "csaq/storage/npy.h"
#include "csaq/storage/tokenizer.h"
#include "fixture_check.h"
#include "support.h"

namespace csaq {
namespace {
using nlohmann::json;
using test::TempDir;

json base_config() {
  return {{"model_type", "llama"},  {"vocab_size", 64},          {"hidden_size", 32},
          {"intermediate_size", 48}, {"num_hidden_layers", 3},   {"num_attention_heads", 4},
          {"num_key_value_heads", 2}, {"rms_norm_eps", 1e-5},    {"rope_theta", 10000.0},
          {"tie_word_embeddings", false}};
}

ModelConfig parse(const json& j) { return ModelConfig::parse(j.dump(), "test/config.json"); }

// ---- config.json ----

TEST(Config, ReadsEveryFixtureAndBothRopeEncodings) {
  CSAQ_REQUIRE_SHARED(llama3, "fixtures/tiny-llama3");
  ModelConfig c = ModelConfig::load(llama3);
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.rope.type, "llama3");  // from transformers-5 "rope_parameters"
  EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.rope.factor, 32.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 64);
  ModelConfig q = ModelConfig::load(test::shared_path("fixtures/tiny-qwen2"));
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.o_bias);
  ModelConfig t = ModelConfig::load(test::shared_path("models/tinystories-656k"));
  EXPECT_DOUBLE_EQ(t.rope.theta, 10000.0);  // top-level "rope_theta", "rope_scaling": null
  EXPECT_EQ(t.rope.type, "default");
}

TEST(Config, LegacyRopeScalingEqualsRopeParameters) {
  json legacy = base_config();
  legacy["rope_theta"] = 500000.0;
  legacy["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                            {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  json modern = base_config();
  modern.erase("rope_theta");
  modern["rope_parameters"] = legacy["rope_scaling"];
  modern["rope_parameters"]["rope_theta"] = 500000.0;
  const ModelConfig a = parse(legacy), b = parse(modern);
  EXPECT_EQ(a.rope.type, b.rope.type);
  EXPECT_EQ(a.rope.factor, b.rope.factor);
  EXPECT_EQ(a.rope.theta, b.rope.theta);
  EXPECT_EQ(a.rope.original_max_position_embeddings, b.rope.original_max_position_embeddings);
  EXPECT_TRUE(at::equal(position_tables(a, 16, at::kFloat).cos, position_tables(b, 16, at::kFloat).cos));
}

TEST(Rope, Llama3ScalingFollowsTheFormulaInEveryFrequencyBand) {
  // Llama 3.1's RoPE settings; head_dim 128 puts frequencies in all three bands.
  json j = base_config();
  j["head_dim"] = 128;
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  const ModelConfig c = parse(j);
  const std::int64_t pos = 3000;
  const PositionTables t = position_tables(c, pos + 1, at::kFloat);
  int bands[3] = {0, 0, 0};
  for (int i = 0; i < 64; ++i) {
    // The published formula in scalar double precision.
    const double inv = 1.0 / std::pow(500000.0, 2.0 * i / 128.0);
    const double wavelen = 2 * M_PI / inv;
    double expected = inv;
    if (wavelen > 8192) {
      expected = inv / 8, ++bands[0];
    } else if (wavelen >= 2048) {
      const double smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0);
      expected = (1 - smooth) * inv / 8 + smooth * inv, ++bands[1];
    } else {
      ++bands[2];
    }
    EXPECT_NEAR(t.cos[pos][i].item<double>(), std::cos(pos * expected), 2e-3) << "frequency " << i;
    EXPECT_NEAR(t.sin[pos][i + 64].item<double>(), std::sin(pos * expected), 2e-3) << "frequency " << i;
  }
  EXPECT_GT(bands[0], 0);
  EXPECT_GT(bands[1], 0);
  EXPECT_GT(bands[2], 0);
}

TEST(Config, HeadDimGivenOrDerivedAndKvHeadsDefaultToHeads) {
  json j = base_config();
  j.erase("num_key_value_heads");
  EXPECT_EQ(parse(j).num_kv_heads, 4);
  EXPECT_EQ(parse(j).head_dim, 8);
  j["head_dim"] = 16;
  EXPECT_EQ(parse(j).head_dim, 16);
}

TEST(ConfigErrors, MissingRequiredKeyIsNamed) {
  for (const char* key : {"model_type", "vocab_size", "hidden_size", "intermediate_size",
                          "num_hidden_layers", "num_attention_heads", "rms_norm_eps", "rope_theta"}) {
    json j = base_config();
    j.erase(key);
    EXPECT_CSAQ_ERROR(parse(j), "test/config.json", std::string("missing required key '") + key);
  }
}

TEST(ConfigErrors, UnsupportedModelTypeListsTheSupportedOnes) {
  json j = base_config();
  j["model_type"] = "gpt2";
  EXPECT_CSAQ_ERROR(parse(j), "unsupported model_type 'gpt2'", "llama, mistral, qwen2");
}

TEST(ConfigErrors, UnsupportedRopeTypeAndMissingLlama3Key) {
  json j = base_config();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  EXPECT_CSAQ_ERROR(parse(j), "unsupported RoPE type 'yarn'", "default, linear, llama3");
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0}};
  EXPECT_CSAQ_ERROR(parse(j), "rope_scaling.original_max_position_embeddings");
}

TEST(ConfigErrors, BadValuesAndMalformedJson) {
  json j = base_config();
  j["num_key_value_heads"] = 3;
  EXPECT_CSAQ_ERROR(parse(j), "not a multiple of num_key_value_heads");
  j = base_config();
  j["hidden_size"] = "32";
  EXPECT_CSAQ_ERROR(parse(j), "'hidden_size' must be a positive integer");
  j = base_config();
  j["hidden_act"] = "gelu";
  EXPECT_CSAQ_ERROR(parse(j), "unsupported hidden_act");
  EXPECT_CSAQ_ERROR(ModelConfig::parse("{\"model_type\": ", "x/config.json"), "x/config.json", "malformed JSON");
  EXPECT_CSAQ_ERROR(ModelConfig::load("/nonexistent-model"), "/nonexistent-model/config.json");
}

// ---- partition ----

TEST(Partition, BalancesBytesWithEmbeddingOnFirstAndHeadOnLast) {
  // 4 equal layers of 10; embedding 10 on rank 0, head 10 on the last rank.
  auto r = partition_layers({10, 10, 10, 10}, 10, 10, 3);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].begin, 0);
  EXPECT_EQ(r[0].end, 1);
  EXPECT_EQ(r[1].end, 3);
  EXPECT_EQ(r[2].end, 4);
  // Heavy embedding pushes layers off rank 0.
  auto h = partition_layers({10, 10, 10, 10}, 100, 0, 2);
  EXPECT_EQ(h[0].size(), 1);
  EXPECT_EQ(h[1].size(), 3);
}

TEST(Partition, RanksTheMaximumDoesNotConstrainShareTheLayersEvenly) {
  // Embedding and head of 100 each dwarf 10 layers of 2: ranks 0 and 3 take one layer each
  // (the maximum, 102, is theirs), and the 8 others split 4 and 4, not 1 and 7.
  auto r = partition_layers(std::vector<std::uint64_t>(10, 2), 100, 100, 4);
  EXPECT_EQ(r[0].size(), 1);
  EXPECT_EQ(r[1].size(), 4);
  EXPECT_EQ(r[2].size(), 4);
  EXPECT_EQ(r[3].size(), 1);
}

TEST(Partition, EveryRankGetsContiguousNonEmptyRangesCoveringAllLayers) {
  for (int world = 1; world <= 7; ++world) {
    auto r = partition_layers(std::vector<std::uint64_t>(7, 5), 3, 4, world);
    std::int64_t next = 0;
    for (const auto& range : r) {
      EXPECT_EQ(range.begin, next);
      EXPECT_GE(range.size(), 1);
      next = range.end;
    }
    EXPECT_EQ(next, 7);
  }
}

TEST(Partition, MoreRanksThanLayersIsAnError) {
  EXPECT_CSAQ_ERROR(partition_layers({1, 1}, 0, 0, 3), "cannot split 2 decoder layers across 3 ranks");
}

// ---- the model against Hugging Face transformers ----

TEST(Model, FixturesMatchTransformersLogitsLossAndGradientsOnOneRank) {
  CSAQ_REQUIRE_SHARED(root, "fixtures");
  for (const char* fixture : test::kFixtures) {
    SCOPED_TRACE(fixture);
    LocalCommunicator comm;
    const std::string dir = test::shared_path(fixture);
    test::expect_matches_reference(test::run_fixture(dir, comm), dir, comm);
  }
}

TEST(Model, FixturesInBfloat16StayWithinBfloat16ToleranceOfTransformers) {
  CSAQ_REQUIRE_SHARED(root, "fixtures");
  for (const char* fixture : test::kFixtures) {
    SCOPED_TRACE(fixture);
    LocalCommunicator comm;
    const std::string dir = test::shared_path(fixture);
    const test::FixtureRun run = test::run_fixture(dir, comm, at::kBFloat16);
    test::expect_matches_reference(run, dir, comm, test::kBfloat16Tolerance);
    EXPECT_EQ(run.grads.begin()->second.scalar_type(), at::kBFloat16);
    // ...and bfloat16 is really in use: the float32 tolerance would be missed.
    EXPECT_GT(test::rel_error(run.eval_logits, storage::SafetensorsFile::open(dir + "/reference.safetensors")->tensor("logits")), 1e-3);
  }
}

TEST(Model, TinyStoriesPerplexityMatchesTransformers) {
  CSAQ_REQUIRE_SHARED(model_dir, "models/tinystories-656k");
  CSAQ_REQUIRE_SHARED(heldout, "data/tinystories-heldout.npy");
  LocalCommunicator comm;
  ModelShard model = load_model_shard(model_dir, 0, 1);
  TokenSequences data = TokenSequences::from_npy(heldout, 512);
  EXPECT_EQ(data.size(), 20);
  Pipeline pipeline(model, comm, PipelineOptions{4, 1});
  const LossTotals totals = pipeline.evaluate(data);
  EXPECT_EQ(totals.predicted_tokens, 20 * 511);
  EXPECT_NEAR(std::exp(totals.mean_nll()), 36.64, 36.64 * 1e-3);  // data/README.md
}

TEST(Model, TiedCheckpointStoringOnlyLmHeadLoads) {
  // tinystories-656k stores lm_head.weight only; the embedding must be that same matrix.
  CSAQ_REQUIRE_SHARED(model_dir, "models/tinystories-656k");
  auto reader = storage::SafetensorsReader::open(model_dir);
  ASSERT_FALSE(reader.contains("model.embed_tokens.weight"));
  ModelShard model = load_model_shard(model_dir, 0, 1);
  const at::Tensor ids = at::tensor({3, 7}, at::kLong).view({1, 2});
  EXPECT_TRUE(at::equal(model.embed(ids)[0][1], reader.load("lm_head.weight")[7]));
}

TEST(ModelErrors, WrongShapeNamesTensorAndFile) {
  TempDir dir;
  const ModelConfig c = parse(base_config());
  auto weights = random_model_weights(c, 1);
  for (auto& [name, t] : weights)
    if (name == "model.layers.1.mlp.up_proj.weight") t = at::zeros({47, 32});
  storage::write_safetensors(dir / "model.safetensors", weights);
  std::ofstream(dir / "config.json") << base_config().dump();
  EXPECT_CSAQ_ERROR(load_model_shard(dir.path(), 0, 1), "model.layers.1.mlp.up_proj.weight",
                    "model.safetensors", "shape [47, 32]", "implies [48, 32]");
}

TEST(ModelErrors, MissingTensorAndNonFloatDtypeAreNamed) {
  const ModelConfig c = parse(base_config());
  auto weights = random_model_weights(c, 1);
  std::map<std::string, at::Tensor> map(weights.begin(), weights.end());
  map.erase("lm_head.weight");
  EXPECT_CSAQ_ERROR(ModelShard(c, 0, 1, map_source(map, "'mem'")), "lm_head.weight", "missing");
  map = std::map<std::string, at::Tensor>(weights.begin(), weights.end());
  map["model.norm.weight"] = map["model.norm.weight"].to(at::kInt);
  EXPECT_CSAQ_ERROR(ModelShard(c, 0, 1, map_source(map, "'mem'")), "model.norm.weight", "Int");
}

TEST(Data, SequencesAreNonOverlappingWindowsWithRemainderDropped) {
  TokenSequences d(at::arange(10, at::kLong), 3, -1, "ten tokens");
  EXPECT_EQ(d.size(), 3);
  EXPECT_TRUE(at::equal(d.batch(1, 2), at::arange(3, 9, at::kLong).view({2, 3})));
  EXPECT_EQ(TokenSequences(at::arange(10, at::kLong), 3, 2, "x").size(), 2);
  EXPECT_CSAQ_ERROR(TokenSequences(at::arange(2, at::kLong), 3, -1, "short file"), "short file",
                    "fewer than one sequence");
  EXPECT_CSAQ_ERROR(d.check_vocabulary(8), "ten tokens", "token id 8 at position 8");
}

TEST(Data, RandomWindowsAreSeededSlicesOfTheStream) {
  const at::Tensor stream = at::arange(1000, at::kLong);
  const TokenSequences a = TokenSequences::random_windows(stream, 16, 8, 3, "s");
  const TokenSequences b = TokenSequences::random_windows(stream, 16, 8, 3, "s");
  const TokenSequences c = TokenSequences::random_windows(stream, 16, 8, 4, "s");
  EXPECT_EQ(a.size(), 8);
  EXPECT_TRUE(at::equal(a.batch(0, 8), b.batch(0, 8)));
  EXPECT_FALSE(at::equal(a.batch(0, 8), c.batch(0, 8)));
  for (std::int64_t i = 0; i < 8; ++i) {  // each window is 16 consecutive tokens of the stream
    const at::Tensor w = a.batch(i, 1)[0];
    EXPECT_TRUE(at::equal(w, at::arange(w[0].item<std::int64_t>(), w[0].item<std::int64_t>() + 16, at::kLong)));
  }
  EXPECT_CSAQ_ERROR(parse_sampling("shuffled"), "unknown sampling 'shuffled'");
}

TEST(Data, JsonlDocumentsAreTokenizedAndJoinedWithEos) {
  CSAQ_REQUIRE_SHARED(model_dir, "models/tinystories-656k");
  TempDir dir;
  std::ofstream(dir / "docs.jsonl") << R"({"text": "Once upon a time"})" << "\n\n" << R"({"text": "The end.", "id": 7})" << "\n";
  const storage::Tokenizer tok = storage::Tokenizer::load(model_dir);
  std::vector<std::int64_t> expected = tok.encode("Once upon a time");
  expected.push_back(2);  // <|end_story|>
  const auto second = tok.encode("The end.");
  expected.insert(expected.end(), second.begin(), second.end());
  EXPECT_TRUE(at::equal(load_token_stream(dir / "docs.jsonl", tokenizer_in(model_dir)), at::tensor(expected, at::kLong)));
  std::ofstream(dir / "bad.jsonl") << R"({"text": "fine"})" << "\n" << R"({"txt": "no"})" << "\n";
  EXPECT_CSAQ_ERROR(load_token_stream(dir / "bad.jsonl", tokenizer_in(model_dir)), "bad.jsonl' line 2", "\"text\"");
  EXPECT_CSAQ_ERROR(load_token_stream(dir / "x.csv", tokenizer_in(model_dir)), "x.csv", "expected .npy token ids, .txt or .jsonl");
  EXPECT_CSAQ_ERROR(load_token_stream(dir / "docs.jsonl", tokenizer_in("")), "needs the model's tokenizer");
}

TEST(Pipeline, MicroBatchSizeAndInFlightDoNotChangeGradients) {
  const ModelConfig c = parse(base_config());
  auto weights = random_model_weights(c, 3);
  std::map<std::string, at::Tensor> map(weights.begin(), weights.end());
  ModelShard model(c, 0, 1, map_source(map, "'mem'"));
  LocalCommunicator comm;
  TokenSequences data(at::randint(64, {6 * 16}, at::kLong), 16, -1, "random");
  auto summed = [&](PipelineOptions opt) {
    std::map<std::string, at::Tensor> sum;  // Σ over micro-batches of (tokens in it) · grad
    Pipeline(model, comm, opt).calibrate(data, [&](const LayerGradients& g) {
      const double weight = static_cast<double>(std::min<std::int64_t>(opt.micro_batch_size,
                                data.size() - g.micro_batch * opt.micro_batch_size));
      for (int j = 0; j < kNumLinears; ++j) {
        auto& s = sum[hf_linear_name(g.layer->index, j)];
        s = s.defined() ? s + weight * g.weight_grads[j] : weight * g.weight_grads[j];
      }
    });
    return sum;
  };
  auto a = summed({1, 1}), b = summed({2, 3}), c3 = summed({4, 4});
  ASSERT_EQ(a.size(), 3u * kNumLinears);
  for (const auto& [name, g] : a) {
    EXPECT_LT(test::rel_error(b[name], g), 1e-5) << name;
    EXPECT_LT(test::rel_error(c3[name], g), 1e-5) << name;
  }
}

// ---- labels drawn from the model, and the divergence between two models ----

TEST(Fidelity, DrawnLabelsFollowTheSoftmaxAndDependOnTheSeedOnly) {
  // Two positions with known distributions over 5 tokens (one with a token of probability 0):
  // the frequencies of 20000 draws per position match them to a few standard errors.
  const at::Tensor probs = at::tensor({0.5, 0.2, 0.15, 0.1, 0.05, 0.0, 0.7, 0.1, 0.1, 0.1}, at::kDouble).reshape({2, 5});
  const at::Tensor logits_one = at::log(probs.clamp_min(1e-300)).to(at::kFloat);
  const std::int64_t draws = 20000;
  // [b = draws, L = 3, V = 5]: position 0 and 1 predict with the two rows; position 2 is unused.
  const at::Tensor logits = at::cat({logits_one, logits_one.slice(0, 0, 1)}).unsqueeze(0).expand({draws, 3, 5}).contiguous();
  const at::Tensor ids = at::full({draws, 3}, 4, at::kLong);
  const at::Tensor a = sample_next_tokens(logits, ids, 7), b = sample_next_tokens(logits, ids, 7);
  ASSERT_EQ(a.sizes(), ids.sizes());
  EXPECT_TRUE(at::equal(a, b));                                     // the seed decides
  EXPECT_FALSE(at::equal(a, sample_next_tokens(logits, ids, 8)));   // and another draws others
  EXPECT_TRUE(at::equal(a.select(1, 0), ids.select(1, 0)));          // position 0 is the text's
  for (std::int64_t pos = 0; pos < 2; ++pos) {
    const at::Tensor freq = at::bincount(a.select(1, pos + 1), {}, 5).to(at::kDouble) / double(draws);
    for (std::int64_t v = 0; v < 5; ++v) {
      const double p = probs[pos][v].item<double>();
      EXPECT_NEAR(freq[v].item<double>(), p, 5 * std::sqrt(p * (1 - p) / double(draws)) + 1e-12)
          << "position " << pos << " token " << v;
    }
  }
  EXPECT_EQ(at::bincount(a.select(1, 2), {}, 5)[0].item<std::int64_t>(), 0);  // probability 0: never drawn
}

TEST(Fidelity, DivergenceEqualsAFloat64ComputationAndIsZeroAgainstItself) {
  at::manual_seed(3);
  const at::Tensor ref = at::randn({2, 6, 11}) * 3, other = ref + at::randn({2, 6, 11});
  const Divergence same = next_token_divergence(ref, ref);
  EXPECT_EQ(same.kl_sum, 0.0);
  EXPECT_EQ(same.top1_agree, 2 * 5);
  const Divergence d = next_token_divergence(ref, other);
  // KL(P || Q) by at::kl_div in float64, over the predicted positions (the last has no next token).
  const at::Tensor p = at::log_softmax(ref.slice(1, 0, 5).to(at::kDouble), -1);
  const at::Tensor q = at::log_softmax(other.slice(1, 0, 5).to(at::kDouble), -1);
  const double expected = at::kl_div(q, p, at::Reduction::Sum, /*log_target=*/true).item<double>();
  EXPECT_NEAR(d.kl_sum, expected, 1e-5 * expected);
  EXPECT_GT(d.kl_sum, 0.0);
  EXPECT_EQ(d.top1_agree, (p.argmax(-1) == q.argmax(-1)).sum().item<std::int64_t>());
  EXPECT_THROW(next_token_divergence(ref, other.slice(1, 0, 5)), Error);
}

}  // namespace
}  // namespace csaq
