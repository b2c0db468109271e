// Stage tests on one process: salience against Hugging Face gradients, co-activation against
// brute force, the quantizer and packer against their definitions, the solver's budget.
#include <algorithm>
#include <numeric>
#include <set>

#include "csaq/packer/checkpoint.h"
#include "csaq/profiler/profiler.h"
#include "csaq/solver/quantizer.h"
#include "csaq/solver/solver.h"
#include "csaq/storage/error.h"
#include "csaq/storage/h5.h"
#include "fixture_check.h"
#include "support.h"

namespace csaq {
namespace {

TEST(Profiler, SalienceOfOneBatchMatchesTransformersForEveryFixture) {
  CSAQ_REQUIRE_SHARED(root, "fixtures");
  for (const char* fixture : test::kFixtures) {
    SCOPED_TRACE(fixture);
    const std::string dir = test::shared_path(fixture);
    LocalCommunicator comm;
    ModelShard model = load_model_shard(dir, 0, 1);
    auto ref = storage::SafetensorsFile::open(dir + "/reference.safetensors");
    const at::Tensor ids = ref->tensor("input_ids").clone();
    TokenSequences data(ids.reshape({-1}), ids.size(1), -1, "fixture");
    Profiler profiler(model, comm, ProfilerOptions{});
    Pipeline(model, comm, PipelineOptions{ids.size(0), 1})
        .calibrate(data, profiler.gradient_callback(), &profiler.observer());
    int checked = 0;
    for (const auto& s : profiler.stats()) {
      const std::string name = hf_linear_name(s.layer, s.linear);
      const at::Tensor grad = ref->tensor("grad." + name), w = profiler.weights(s.layer, s.linear).weight.detach();
      EXPECT_LT(test::rel_error(profiler.salience(s.layer, s.linear, SalienceKind::kCausal), ref->tensor("salience." + name)), 1e-3) << name;
      EXPECT_LT(test::rel_error(profiler.salience(s.layer, s.linear, SalienceKind::kFisher), grad * grad), 2e-3) << name;
      EXPECT_TRUE(at::equal(profiler.salience(s.layer, s.linear, SalienceKind::kMagnitude), w.abs())) << name;
      EXPECT_EQ(s.tokens, ids.numel());
      ++checked;
    }
    EXPECT_EQ(checked, model.config().num_layers * kNumLinears);
  }
}

// A two-layer random Llama calibrated on three random sequences.
class ToyCalibration : public ::testing::Test {
 protected:
  ToyCalibration()
      : config_(ModelConfig::parse(
            R"({"model_type":"llama","vocab_size":50,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,
                "num_attention_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0})", "test config")),
        weights_(as_map(random_model_weights(config_, 5))),
        model_(config_, 0, 1, map_source(weights_, "'mem'")),
        profiler_(model_, comm_, ProfilerOptions{}) {}

  // Calibrates, also handing every Linear input to `extra`.
  void calibrate(const LinearObserver& extra = {}) {
    LinearObserver both = [&](std::int64_t l, int i, const at::Tensor& x, const at::Tensor& y) {
      profiler_.observer()(l, i, x, y);
      if (extra) extra(l, i, x, y);
    };
    TokenSequences data(at::randint(50, {3 * 8}, at::kLong), 8, -1, "random");
    Pipeline(model_, comm_, PipelineOptions{1, 1}).calibrate(data, profiler_.gradient_callback(), &both);
  }

  template <typename Pairs>
  static std::map<std::string, at::Tensor> as_map(const Pairs& pairs) {
    return std::map<std::string, at::Tensor>(pairs.begin(), pairs.end());
  }

  ModelConfig config_;
  std::map<std::string, at::Tensor> weights_;
  ModelShard model_;
  LocalCommunicator comm_;
  Profiler profiler_;
};

TEST_F(ToyCalibration, ActivationSalienceIsWeightTimesMeanAbsoluteInput) {
  std::map<std::pair<std::int64_t, int>, at::Tensor> inputs;  // independent record of every Linear input
  calibrate([&](std::int64_t l, int i, const at::Tensor& x, const at::Tensor&) {
    at::Tensor flat = x.detach().reshape({-1, x.size(-1)}).clone();
    auto& all = inputs[{l, i}];
    all = all.defined() ? at::cat({all, flat}) : flat;
  });
  for (const auto& [key, x] : inputs) {
    const at::Tensor expected = profiler_.weights(key.first, key.second).weight.detach().abs() * x.abs().mean(0);
    EXPECT_LT(test::rel_error(profiler_.salience(key.first, key.second, SalienceKind::kActivation), expected), 1e-5);
  }
}

const SalienceKind kAllKinds[] = {SalienceKind::kCausal, SalienceKind::kFisher, SalienceKind::kActivation,
                                  SalienceKind::kMagnitude};

TEST_F(ToyCalibration, RowBlocksAndSampledValuesEqualTheFullSalience) {
  calibrate();
  for (SalienceKind kind : kAllKinds)
    for (const auto& s : profiler_.stats()) {
      SCOPED_TRACE(std::string(salience_kind_name(kind)) + " " + hf_linear_name(s.layer, s.linear));
      const at::Tensor full = profiler_.salience(s.layer, s.linear, kind);
      EXPECT_TRUE(at::equal(profiler_.salience_rows(s.layer, s.linear, kind, 3, 7), full.slice(0, 3, 7)));
      const at::Tensor flat = at::randint(full.numel(), {40}, at::kLong);
      EXPECT_TRUE(at::equal(profiler_.salience_at(s.layer, s.linear, kind, flat), full.reshape({-1}).index_select(0, flat)));
    }
}

// Brute force: the top `fraction` of all values are those strictly above the value ranked
// floor(fraction * n) + 1 (so ties never overfill it).
at::Tensor brute_force_top(const Profiler& p, SalienceKind kind, double fraction) {
  std::vector<at::Tensor> parts;
  for (const auto& s : p.stats()) parts.push_back(p.salience(s.layer, s.linear, kind).reshape({-1}));
  const at::Tensor all = at::cat(parts);
  const auto m = static_cast<std::int64_t>(std::floor(fraction * static_cast<double>(all.numel())));
  return all > std::get<0>(all.sort(0, /*descending=*/true))[m];
}

TEST_F(ToyCalibration, TopFractionAgreementEqualsBruteForceInAnyBlockSize) {
  calibrate();
  const std::pair<SalienceKind, SalienceKind> pairs[] = {{SalienceKind::kCausal, SalienceKind::kActivation},
                                                         {SalienceKind::kFisher, SalienceKind::kMagnitude}};
  for (const auto& [a, b] : pairs)
    for (double fraction : {0.05, 0.3, 0.77}) {
      const at::Tensor top_a = brute_force_top(profiler_, a, fraction), top_b = brute_force_top(profiler_, b, fraction);
      ASSERT_GT(top_a.sum().item<std::int64_t>(), 0);
      const double expected = double(at::logical_and(top_a, top_b).sum().item<std::int64_t>()) /
                              double(top_a.sum().item<std::int64_t>());
      for (std::int64_t chunk : {std::int64_t{1} << 24, std::int64_t{50}, std::int64_t{1}})
        EXPECT_EQ(top_fraction_agreement(profiler_, a, b, fraction, comm_, chunk), expected)
            << salience_kind_name(a) << " vs " << salience_kind_name(b) << " top " << fraction << " chunk " << chunk;
    }
  // Ties: magnitude against itself agrees fully.
  EXPECT_EQ(top_fraction_agreement(profiler_, SalienceKind::kMagnitude, SalienceKind::kMagnitude, 0.05, comm_), 1.0);
}

TEST(CoActivation, CountsAndJaccardEqualBruteForce) {
  const std::int64_t channels = 40, k = 12;
  CoActivation tracker(channels, k, 0.25);
  std::vector<at::Tensor> batches;
  for (int b = 0; b < 4; ++b) batches.push_back(at::randn({2, 7, channels}));
  for (const auto& y : batches) tracker.observe(y);
  // Candidates: the k largest mean |y| on the first batch.
  const at::Tensor mean0 = batches[0].reshape({-1, channels}).abs().mean(0);
  std::vector<std::int64_t> order(channels);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return mean0[a].item<float>() > mean0[b].item<float>(); });
  std::vector<std::int64_t> cand(order.begin(), order.begin() + k);
  std::sort(cand.begin(), cand.end());
  ASSERT_TRUE(at::equal(tracker.candidates(), at::tensor(cand, at::kLong)));
  // Firing sets token by token.
  std::vector<std::set<std::int64_t>> fires(channels);
  std::int64_t token = 0;
  for (const auto& y : batches) {
    const at::Tensor a = y.reshape({-1, channels}).abs();
    for (std::int64_t t = 0; t < a.size(0); ++t, ++token) {
      std::vector<float> v(channels);
      for (std::int64_t c = 0; c < channels; ++c) v[c] = a[t][c].item<float>();
      std::vector<float> sorted = v;
      std::sort(sorted.rbegin(), sorted.rend());
      const float threshold = sorted[9];  // top 25% of 40 channels = 10
      for (std::int64_t c = 0; c < channels; ++c)
        if (v[c] >= threshold) fires[c].insert(token);
    }
  }
  const at::Tensor jac = tracker.jaccard();
  for (std::int64_t i = 0; i < k; ++i)
    for (std::int64_t j = 0; j < k; ++j) {
      const auto& fi = fires[cand[i]];
      const auto& fj = fires[cand[j]];
      std::int64_t inter = 0;
      for (auto t : fi) inter += fj.count(t);
      const std::int64_t uni = std::int64_t(fi.size() + fj.size()) - inter;
      EXPECT_EQ(tracker.counts()[i][j].item<std::int64_t>(), inter);
      EXPECT_DOUBLE_EQ(jac[i][j].item<double>(), uni ? double(inter) / double(uni) : 0.0);
    }
  EXPECT_EQ(tracker.tokens(), token);
}

TEST(CoActivation, MemoryIsConstantInTheNumberOfTokens) {
  CoActivation tracker(256, 64, 0.1);
  tracker.observe(at::randn({1, 16, 256}));
  const std::size_t after_one = tracker.state_bytes();
  for (int i = 0; i < 50; ++i) tracker.observe(at::randn({4, 64, 256}));
  EXPECT_EQ(tracker.state_bytes(), after_one);
  EXPECT_EQ(after_one, 64 * 8 + 64 * 64 * 8 + sizeof(CoActivation));
}

TEST(Cliques, LeadersAreTheMostSalientAndTakeSimilarChannels) {
  // Candidates 0..3: 0 and 2 always fire together, 1 and 3 together, never across.
  CoActivation tracker(6, 4, 0.5);
  tracker.restore(at::arange(4, at::kLong),
                  at::tensor({10, 0, 10, 0, 0, 8, 0, 8, 10, 0, 10, 0, 0, 8, 0, 8}, at::kLong).view({4, 4}), 20);
  const at::Tensor leaders = find_cliques(tracker, at::tensor({1.0, 5.0, 3.0, 2.0, 9.0, 0.0}), 0.85);
  // Channel 2 outranks 0, 1 outranks 3; 4 and 5 are not candidates: singletons.
  EXPECT_TRUE(at::equal(leaders, at::tensor({2, 1, 2, 1, 4, 5}, at::kLong)));
  EXPECT_TRUE(at::equal(find_cliques(tracker, at::ones({6}), 1.01), at::arange(6, at::kLong)));
}

TEST(Spearman, MatchesKnownCorrelations) {
  const at::Tensor a = at::tensor({1.0, 2.0, 3.0, 4.0, 5.0});
  EXPECT_DOUBLE_EQ(spearman(a, a * 10 + 3), 1.0);
  EXPECT_DOUBLE_EQ(spearman(a, -a), -1.0);
  EXPECT_NEAR(spearman(a, at::tensor({2.0, 1.0, 4.0, 3.0, 5.0})), 0.8, 1e-12);  // 1 - 6*4/(5*24)
}

TEST(Quantizer, CodesPackDenselyAndRoundTripForEveryWidth) {
  for (int bits : {1, 2, 3, 4, 8, 16}) {
    const std::int64_t in = 37;
    const at::Tensor codes = at::randint(0, bits == 16 ? 65536 : (1 << bits), {5, in}, at::kLong);
    const at::Tensor packed = pack_codes(codes, bits);
    EXPECT_EQ(packed.size(1), (in * bits + 7) / 8) << bits;
    EXPECT_TRUE(at::equal(unpack_codes(packed, bits, in), codes)) << bits;
  }
  // Little-endian bit order: codes 1,2,3 at 2 bits are 0b111001.
  EXPECT_EQ(pack_codes(at::tensor({1, 2, 3}, at::kLong).view({1, 3}), 2)[0][0].item<int>(), 0b111001);
}

TEST(Quantizer, ErrorIsAtMostHalfAStepAndScalesAreFp16) {
  const at::Tensor w = at::randn({400, 64});  // many groups: fp16 rounding must never clip
  for (int bits : {2, 3, 4, 8}) {
    const GroupParams p = group_params(w, bits, 16);
    EXPECT_TRUE(at::equal(p.scale, p.scale.to(at::kHalf).to(at::kFloat)));
    const at::Tensor deq = dequantize_rows(quantize_rows(w, p, bits, 16), p, bits, 16);
    const at::Tensor step = p.scale.repeat_interleave(16, 1);
    EXPECT_TRUE(((deq - w).abs() <= step * 0.5 + 1e-6).all().item<bool>()) << bits;
  }
  EXPECT_TRUE(at::equal(dequantize_rows(quantize_rows(w, {}, 16, 64), {}, 16, 64), w.to(at::kHalf).to(at::kFloat)));
  EXPECT_CSAQ_ERROR(effective_group(96, 64), "does not divide");
}

TEST(Packer, UnpackReproducesTheQuantizerExactlyWithFollowersOnTheirLeadersScale) {
  const at::Tensor w = at::randn({6, 32});
  const at::Tensor bits = at::tensor({4, 2, 4, 16, 8, 2}, at::kByte);
  const at::Tensor leader = at::tensor({0, 5, 0, 3, 4, 5}, at::kLong);  // rows 2 -> 0 and 1 -> 5 are followers
  const PackedLinear p = pack_linear(w, bits, leader, 16);
  EXPECT_EQ(p.scales.size(0), 3);  // leaders 0, 4, 5 (row 3 is 16-bit)
  const at::Tensor got = unpack_linear(p);
  for (std::int64_t r = 0; r < 6; ++r) {
    const int b = bits[r].item<int>();
    const at::Tensor row = w.slice(0, r, r + 1);
    at::Tensor expected;
    if (b == 16) {
      expected = row.to(at::kHalf).to(at::kFloat);
    } else {
      const GroupParams lp = group_params(w.slice(0, leader[r].item<std::int64_t>(), leader[r].item<std::int64_t>() + 1), b, 16);
      expected = dequantize_rows(quantize_rows(row, lp, b, 16), lp, b, 16);
    }
    EXPECT_TRUE(at::equal(got.slice(0, r, r + 1), expected)) << "row " << r;
  }
}

// Random Linears with random salience and a few cliques, for solver tests.
std::vector<LinearInput> random_linears(int layers, std::uint64_t seed) {
  at::manual_seed(seed);
  std::vector<LinearInput> out;
  for (int l = 0; l < layers; ++l)
    for (int i = 0; i < kNumLinears; ++i) {
      const std::int64_t rows = 8 + 4 * i, cols = 256;
      at::Tensor leader = at::arange(rows, at::kLong);
      leader[1] = 0;
      leader[2] = 0;
      out.push_back({l, i, at::randn({rows, cols}), at::rand({rows, cols}).pow(3), leader});
    }
  return out;
}

TEST(Solver, AchievedBitsLieWithinOneUnitBelowTheTarget) {
  LocalCommunicator comm;
  const auto linears = random_linears(2, 7);
  std::int64_t largest_unit_step = 0;  // one unit's granularity: its biggest jump between options
  for (const std::vector<int>& opts : {std::vector<int>{2, 4, 8, 16}, {2, 3, 4}, {1, 2, 3, 4, 8}}) {
    for (double target : {2.8, 3.3, 3.75, 4.2}) {
      SolverOptions o;
      o.bit_options = opts;
      o.target_bits = target;
      o.group_size = 64;
      const Plan plan = solve(linears, 2, comm, o);
      largest_unit_step = 3 * 256 * (opts.back() - opts.front()) + 4 * (kScaleBits + kZeroBits);
      const double budget = target * double(plan.summary.weights);
      EXPECT_LE(double(plan.summary.total_bits), budget) << target;
      EXPECT_GE(double(plan.summary.total_bits), budget - double(largest_unit_step)) << target << " " << opts.size();
      // The summary is a recount of the plan itself.
      std::int64_t weights = 0;
      for (const auto& lp : plan.linears) weights += lp.row_bits.numel() * 256;
      EXPECT_EQ(weights, plan.summary.weights);
    }
  }
}

TEST(Solver, MoreSalientUnitsGetMoreBits) {
  LocalCommunicator comm;
  auto linears = random_linears(1, 3);
  linears[0].salience.slice(0, 5, 6).mul_(1000);  // row 5 matters most
  SolverOptions o;
  o.bit_options = {2, 4, 8};
  o.target_bits = 3.5;
  o.group_size = 64;
  const Plan plan = solve(linears, 1, comm, o);
  const at::Tensor bits = plan.linears[0].row_bits.to(at::kLong);
  EXPECT_EQ(bits[5].item<std::int64_t>(), bits.max().item<std::int64_t>());
  EXPECT_TRUE(at::equal(bits.slice(0, 0, 3), bits[0].expand({3})));  // a clique shares its bits
}

TEST(Solver, ThresholdAndUniformStayWithinBudget) {
  LocalCommunicator comm;
  const auto linears = random_linears(2, 11);
  for (SolverKind kind : {SolverKind::kThreshold, SolverKind::kUniform}) {
    SolverOptions o;
    o.kind = kind;
    o.bit_options = {2, 3, 4, 8};
    o.target_bits = 4.0;
    o.group_size = 64;
    const Plan plan = solve(linears, 2, comm, o);
    EXPECT_LE(double(plan.summary.total_bits), 4.0 * double(plan.summary.weights));
    if (kind == SolverKind::kUniform) {
      EXPECT_EQ(plan.summary.histogram.size(), 4u);
      std::int64_t used = 0;
      for (const auto& [b, n] : plan.summary.histogram) used += n > 0;
      EXPECT_EQ(used, 1);  // one width for everything
    }
  }
}

TEST(Solver, ABudgetBelowTheSmallestOptionIsAnError) {
  LocalCommunicator comm;
  SolverOptions o;
  o.bit_options = {2, 4};
  o.target_bits = 2.1;  // 2-bit codes plus scales and row maps exceed it
  o.group_size = 64;
  EXPECT_CSAQ_ERROR(solve(random_linears(1, 1), 1, comm, o), "--target-bits 2.1 is unreachable");
}

TEST(Solver, UnreachableTargetsAreRefusedUpFront) {
  SolverOptions o;
  o.bit_options = {2, 4};
  o.group_size = 128;
  o.target_bits = 2.0;  // codes alone take 2 bits; scales and maps push the minimum above
  EXPECT_CSAQ_ERROR(check_target_reachable({{256, 1024}}, o), "--target-bits 2 is unreachable", "cannot go below");
  o.target_bits = 4.5;
  EXPECT_CSAQ_ERROR(check_target_reachable({{256, 1024}}, o), "cannot exceed");
  o.target_bits = 3.0;
  check_target_reachable({{256, 1024}}, o);
  EXPECT_CSAQ_ERROR(parse_bit_options("2,5"), "5 is not one of");
  EXPECT_EQ(parse_bit_options("8,2,4"), (std::vector<int>{2, 4, 8}));
}

}  // namespace
}  // namespace csaq
