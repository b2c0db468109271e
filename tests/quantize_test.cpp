// Stage tests on one process: salience against Hugging Face gradients, co-activation against
// brute force, the quantizer and packer against their definitions, the solver's budget.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

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
      EXPECT_LT(test::rel_error(s.grad_sum, grad), 1e-3) << name;
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
    Pipeline(model_, comm_, PipelineOptions{1, 1}).calibrate(data_, profiler_.gradient_callback(), &both);
  }

  // Mean over the micro-batches (one sequence each) of their mean next-token loss.
  double mean_loss() { return Pipeline(model_, comm_, PipelineOptions{1, 1}).evaluate(data_).mean_nll(); }

  template <typename Pairs>
  static std::map<std::string, at::Tensor> as_map(const Pairs& pairs) {
    return std::map<std::string, at::Tensor>(pairs.begin(), pairs.end());
  }

  ModelConfig config_;
  std::map<std::string, at::Tensor> weights_;
  ModelShard model_;
  LocalCommunicator comm_;
  Profiler profiler_;
  TokenSequences data_{at::randint(50, {3 * 8}, at::make_generator<at::CPUGeneratorImpl>(11), at::kLong), 8, -1, "random"};
};

TEST_F(ToyCalibration, HessiansAndOutputGradientEnergyEqualADirectComputation) {
  calibrate();
  // Directly: every sequence through the layers by hand, keeping each Linear's input and
  // output, then the gradient of the sequence's mean loss with respect to every output.
  std::map<std::pair<std::int64_t, int>, at::Tensor> energy, hessian;
  const PositionTables pos = position_tables(config_, 8, at::kFloat);
  for (std::int64_t m = 0; m < data_.size(); ++m) {
    std::vector<std::pair<std::int64_t, int>> keys;
    std::vector<at::Tensor> outputs;
    LinearObserver keep = [&](std::int64_t l, int i, const at::Tensor& x, const at::Tensor& y) {
      keys.emplace_back(l, i);
      outputs.push_back(y);
      const at::Tensor xf = x.detach().reshape({-1, x.size(-1)});
      auto& h = hessian[{l, i}];
      h = h.defined() ? h + xf.t().matmul(xf) : xf.t().matmul(xf);
    };
    at::AutoGradMode grad(true);
    const at::Tensor ids = data_.batch(m, 1);
    at::Tensor x = model_.embed(ids);
    for (std::size_t l = 0; l < model_.decoder().size(); ++l) x = model_.layer_forward(l, x, pos, &keep);
    const at::Tensor loss = next_token_nll_sum(model_.head(x), ids) / 7.0;
    const auto grads = torch::autograd::grad({loss}, outputs);
    for (std::size_t k = 0; k < keys.size(); ++k) {
      const at::Tensor e = grads[k].reshape({-1, grads[k].size(-1)}).to(at::kDouble).square().sum(0);
      auto& acc = energy[keys[k]];
      acc = acc.defined() ? acc + e : e;
    }
  }
  for (const auto& s : profiler_.stats()) {
    SCOPED_TRACE(hf_linear_name(s.layer, s.linear));
    EXPECT_LT(test::rel_error(s.out_grad_sq, energy[{s.layer, s.linear}]), 1e-5);
    EXPECT_LT(test::rel_error(profiler_.linear_hessian(s.layer, s.linear), hessian[{s.layer, s.linear}]), 1e-5);
  }
  // The second-order cost (the fidelity objective's default) of a change Δ of each row is
  // ½ Δ_r H Δ_rᵀ · energy_r / M², from the directly computed energy and H, in float64.
  at::manual_seed(5);
  const double m2 = double(data_.size()) * double(data_.size());
  for (const auto& s : profiler_.stats()) {
    SCOPED_TRACE(hf_linear_name(s.layer, s.linear));
    const at::Tensor delta = at::randn(profiler_.weights(s.layer, s.linear).weight.sizes()) * 0.01;
    const at::Tensor d = delta.to(at::kDouble), h = hessian[{s.layer, s.linear}].to(at::kDouble);
    const at::Tensor direct = energy[{s.layer, s.linear}] * (d.matmul(h) * d).sum(1) / (2 * m2);
    const at::Tensor cost = profiler_.row_cost(s.layer, s.linear, SalienceKind::kHessian, delta, 0);
    ASSERT_EQ(cost.sizes(), direct.sizes());
    EXPECT_LT(test::rel_error(cost, direct), 1e-5);
    EXPECT_GT(direct.min().item<double>(), 0.0);
  }
  EXPECT_TRUE(profiler_.linear_hessian(0, 0).is_same(profiler_.linear_hessian(0, 2)));  // q, k, v share one input
  EXPECT_FALSE(profiler_.linear_hessian(0, 4).is_same(profiler_.linear_hessian(0, 3)));
  EXPECT_EQ(profiler_.hessian_tokens(1, input_of(6)), data_.tokens());
  // A matrix asked for and then added to: the next one asked for has the new data.
  const at::Tensor once = profiler_.linear_hessian(1, 6).clone();
  calibrate();
  EXPECT_LT(test::rel_error(profiler_.linear_hessian(1, 6), 2 * once), 1e-6);
}

// Sets every Linear to W + t·deltas (or back to W with t = 0).
void move_linears(ModelShard& model, const std::vector<at::Tensor>& w0, const std::vector<at::Tensor>& deltas, double t) {
  std::size_t k = 0;
  for (const DecoderLayer& layer : model.decoder())
    for (int i = 0; i < kNumLinears; ++i, ++k) model.set_linear_weight(layer.index, i, w0[k] + t * deltas[k]);
}

TEST_F(ToyCalibration, TaylorCostPredictsTheLossChangeOfASmallStep) {
  calibrate();
  // A small step down the calibration gradient: the first-order term dominates.
  std::vector<at::Tensor> w0, deltas;
  double predicted = 0;
  for (const auto& s : profiler_.stats()) {
    w0.push_back(profiler_.weights(s.layer, s.linear).weight.detach().clone());
    deltas.push_back(-0.005 * s.grad_sum / double(s.micro_batches));
    predicted += profiler_.row_cost(s.layer, s.linear, SalienceKind::kTaylor, deltas.back(), 0).sum().item<double>();
    EXPECT_TRUE((profiler_.row_cost(s.layer, s.linear, SalienceKind::kHessian, deltas.back(), 0) >= 0).all().item<bool>());
  }
  const double before = mean_loss();
  move_linears(model_, w0, deltas, 1.0);
  const double actual = mean_loss() - before;
  move_linears(model_, w0, deltas, 0.0);
  ASSERT_LT(actual, 0);
  EXPECT_NEAR(predicted, actual, 0.05 * std::abs(actual));
}

TEST_F(ToyCalibration, PostQuantizationIntegralSumsToTheLossChangeOfQuantizing) {
  calibrate();
  // Every Linear at 3 then at 2 bits (GPTQ): the integral along the straight path, by 3-point
  // Gauss-Legendre, summed over all rows is L(Q) - L(W).
  const std::vector<Format> formats{{3, 8}, {2, 8}};
  auto delta_of = [&](std::int64_t l, int i, std::size_t f) {
    const at::Tensor w = profiler_.weights(l, i).weight.detach().clone();  // the weights as they are now
    at::Tensor delta;
    for_each_format(w, at::arange(w.size(0), at::kLong), profiler_.linear_hessian(l, i), {formats[f]},
                    QuantizerOptions{}, [&](std::size_t, const Quantized& q) { delta = q.values - w; });
    return delta;
  };
  std::vector<at::Tensor> w0;
  for (const auto& s : profiler_.stats()) w0.push_back(profiler_.weights(s.layer, s.linear).weight.detach().clone());
  const double before = mean_loss();
  profiler_.integrate_pqi(model_, data_, PipelineOptions{1, 1}, formats.size(), 3, delta_of);
  EXPECT_DOUBLE_EQ(mean_loss(), before);  // the weights are back
  for (std::size_t f = 0; f < formats.size(); ++f) {
    std::vector<at::Tensor> deltas;
    double integral = 0;
    for (const auto& s : profiler_.stats()) {
      deltas.push_back(delta_of(s.layer, s.linear, f));
      integral += s.pqi[static_cast<std::int64_t>(f)].sum().item<double>();
      EXPECT_TRUE(at::equal(profiler_.row_cost(s.layer, s.linear, SalienceKind::kPqi, {}, f), s.pqi[static_cast<std::int64_t>(f)]));
    }
    move_linears(model_, w0, deltas, 1.0);
    const double actual = mean_loss() - before;
    move_linears(model_, w0, deltas, 0.0);
    ASSERT_GT(std::abs(actual), 1e-4);
    // Gauss-Legendre with 3 points is exact up to degree 5 along the path; 2-bit steps are long.
    EXPECT_NEAR(integral, actual, 1e-2 * std::abs(actual)) << formats[f].bits << " bits";
  }
}

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

const SalienceKind kPerWeightKinds[] = {SalienceKind::kCausal, SalienceKind::kFisher, SalienceKind::kActivation,
                                        SalienceKind::kMagnitude};

TEST_F(ToyCalibration, RowBlocksAndSampledValuesEqualTheFullSalience) {
  calibrate();
  for (SalienceKind kind : kPerWeightKinds)
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

// Feeds `batches` ([b, t, channels] each) to a tracker and checks its candidates, counts and
// Jaccard against firing sets built token by token with a full sort.
void expect_counts_equal_brute_force(const std::vector<at::Tensor>& batches, std::int64_t channels, std::int64_t k,
                                     double fraction) {
  CoActivation tracker(channels, k, fraction);
  for (const auto& y : batches) tracker.observe(y);
  // Candidates: the k largest mean |y| on the first batch.
  const at::Tensor mean0 = batches[0].reshape({-1, channels}).abs().to(at::kFloat).mean(0);
  std::vector<std::int64_t> order(channels);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return mean0[a].item<float>() > mean0[b].item<float>(); });
  std::vector<std::int64_t> cand(order.begin(), order.begin() + k);
  std::sort(cand.begin(), cand.end());
  ASSERT_TRUE(at::equal(tracker.candidates(), at::tensor(cand, at::kLong)));
  const auto top = static_cast<std::size_t>(std::ceil(fraction * static_cast<double>(channels)));
  // Firing sets token by token.
  std::vector<std::set<std::int64_t>> fires(channels);
  std::int64_t token = 0;
  for (const auto& y : batches) {
    const at::Tensor a = y.reshape({-1, channels}).abs().to(at::kFloat);
    for (std::int64_t t = 0; t < a.size(0); ++t, ++token) {
      std::vector<float> v(channels);
      for (std::int64_t c = 0; c < channels; ++c) v[c] = a[t][c].item<float>();
      std::vector<float> sorted = v;
      std::sort(sorted.rbegin(), sorted.rend());
      const float threshold = sorted[top - 1];
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
      ASSERT_EQ(tracker.counts()[i][j].item<std::int64_t>(), inter) << i << ", " << j;
      EXPECT_DOUBLE_EQ(jac[i][j].item<double>(), uni ? double(inter) / double(uni) : 0.0);
    }
  EXPECT_EQ(tracker.tokens(), token);
}

TEST(GramMatrix, OneTriangleInBlocksGivesTheWholeSymmetricProductInHalfTheMemory) {
  at::manual_seed(3);
  for (const std::int64_t n : {std::int64_t{1}, kGramBlock, kGramBlock + 88, 3 * kGramBlock}) {
    GramMatrix g(n);
    at::Tensor reference = at::zeros({n, n}, at::kDouble);
    for (int batch = 0; batch < 3; ++batch) {
      const at::Tensor x = at::randn({50 + batch, n});
      g.add(x);
      reference += at::matmul(x.t().to(at::kDouble), x.to(at::kDouble));
    }
    const at::Tensor full = g.full();
    EXPECT_TRUE(at::equal(full, full.t())) << n;  // exactly symmetric
    EXPECT_LT(test::rel_error(full.to(at::kDouble), reference), 1e-6) << n;
    GramMatrix copy(n);
    copy.assign(full);
    EXPECT_TRUE(at::equal(copy.full(), full)) << n;
  }
  // Three row blocks of B rows keep 3B, 2B and B columns: 6B² floats of the 9B² whole.
  EXPECT_EQ(GramMatrix::bytes_for(3 * kGramBlock), 4 * 6 * kGramBlock * kGramBlock);
  EXPECT_EQ(GramMatrix::bytes_for(1), 4);
}

TEST(CoActivation, CountsAndJaccardEqualBruteForce) {
  std::vector<at::Tensor> batches;
  for (int b = 0; b < 4; ++b) batches.push_back(at::randn({2, 7, 40}));
  expect_counts_equal_brute_force(batches, 40, 12, 0.25);  // top 25% of 40 channels = 10
}

TEST(CoActivation, CountsAreExactAcrossWordsWithTiesAndSixteenBitInputs) {
  // 2 x 75 tokens a batch: bit vectors of 3 words, the last one partial; small integer values
  // make ties at the threshold common (every tied channel fires).
  std::vector<at::Tensor> batches;
  for (int b = 0; b < 3; ++b) batches.push_back(at::randint(-3, 4, {2, 75, 50}).to(at::kFloat));
  expect_counts_equal_brute_force(batches, 50, 20, 0.1);
  batches.clear();
  for (int b = 0; b < 2; ++b) batches.push_back(at::randn({1, 130, 33}).to(at::kBFloat16));
  expect_counts_equal_brute_force(batches, 33, 33, 0.3);  // every channel a candidate
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
  // Bit streams of mixed widths: one continuous stream, padded once.
  const at::Tensor widths = at::tensor({3, 1, 8, 2, 15, 5}, at::kLong);
  const at::Tensor values = at::tensor({5, 1, 200, 2, 30000, 17}, at::kLong);
  const at::Tensor stream = pack_bit_stream(values, widths);
  EXPECT_EQ(stream.numel(), (3 + 1 + 8 + 2 + 15 + 5 + 7) / 8);
  EXPECT_TRUE(at::equal(unpack_bit_stream(stream, widths), values));
  EXPECT_EQ(stream[0].item<int>(), 5 | 1 << 3 | (200 & 0xF) << 4);
}

TEST(Quantizer, FormatsAreEveryBitOptionWithEveryGroupOptionOnce) {
  const auto f = linear_formats(128, {2, 4, 16}, {32, 128, -1});
  ASSERT_EQ(f.size(), 5u);  // 128 and -1 are both the whole row
  EXPECT_EQ(f[0], (Format{2, 128}));
  EXPECT_EQ(f[1], (Format{2, 32}));
  EXPECT_EQ(f[4], (Format{16, 0}));
  EXPECT_CSAQ_ERROR(linear_formats(96, {4}, {64}), "does not divide");
}

TEST(Quantizer, ClipSearchNeverLosesToMinMaxAndScalesAreFp16) {
  const at::Tensor w = at::randn({200, 64}) * at::rand({1, 64});
  const at::Tensor c = at::rand({64}) + 0.1;  // column weights (diag H)
  QuantizerOptions plain;
  plain.clip_steps = 0;
  for (int bits : {2, 3, 4, 8}) {
    const GroupParams p = group_params(w, bits, 16, c, QuantizerOptions{});
    const GroupParams m = group_params(w, bits, 16, c, plain);
    EXPECT_TRUE(at::equal(p.scale, p.scale.to(at::kHalf).to(at::kFloat)));
    auto err = [&](const GroupParams& gp) {
      RowSpec spec{at::full({200}, bits, at::kLong), at::full({200}, 16, at::kLong), gp.scale, gp.zero};
      return ((quantize_nearest(w, spec).values - w).square() * c).reshape({200, 4, 16}).sum(2);
    };
    const at::Tensor clipped = err(p), minmax = err(m);
    EXPECT_TRUE((clipped <= minmax).all().item<bool>()) << bits;
    if (bits <= 3) {
      EXPECT_LT(clipped.sum().item<double>(), 0.95 * minmax.sum().item<double>()) << bits;
    }
    // Min/max ranges: every value within half a step (up to fp16 rounding of the scale).
    const at::Tensor step = m.scale.repeat_interleave(16, 1);
    RowSpec spec{at::full({200}, bits, at::kLong), at::full({200}, 16, at::kLong), m.scale, m.zero};
    EXPECT_TRUE(((quantize_nearest(w, spec).values - w).abs() <= step * 0.5 + step * 2e-3 * (1 << bits)).all().item<bool>())
        << bits;
  }
}

// GPTQ written out as the optimal-brain-surgeon update, in float64: quantize the columns one
// at a time (in order of decreasing H_jj), spread each one's error over the columns left
// through the inverse Hessian, then drop the column from the inverse (16-bit rows are only
// rounded to fp16).
at::Tensor reference_gptq(const at::Tensor& w0, const RowSpec& spec, const at::Tensor& h0, double damp) {
  const std::int64_t n = w0.size(0), in = w0.size(1);
  at::Tensor w = w0.to(at::kDouble).clone(), h = h0.to(at::kDouble).clone();
  const at::Tensor order = std::get<1>(at::sort(h.diagonal(), /*stable=*/true, 0, /*descending=*/true));
  h += damp * h.diagonal().mean() * at::eye(in, at::kDouble);
  at::Tensor hinv = at::inverse(h);
  at::Tensor q = at::zeros_like(w);
  for (std::int64_t k = 0; k < in; ++k) {
    const std::int64_t j = order[k].item<std::int64_t>();
    for (std::int64_t r = 0; r < n; ++r) {
      const int b = static_cast<int>(spec.bits[r].item<std::int64_t>());
      double v = w[r][j].item<double>();
      if (b == 16) {
        v = static_cast<double>(at::tensor({v}, at::kDouble).to(at::kHalf).to(at::kFloat).item<float>());
      } else {
        const std::int64_t g = j / spec.group[r].item<std::int64_t>();
        const double s = spec.scale[r][g].item<double>(), z = spec.zero[r][g].item<double>();
        const double code = std::min(std::max(std::nearbyint(v / s) + z, 0.0), double((1 << b) - 1));
        v = (code - z) * s;
      }
      q[r][j] = v;
    }
    // 16-bit rows keep their values: nothing to compensate.
    const at::Tensor err = at::where(spec.bits == 16, at::zeros({n}, at::kDouble), (w.select(1, j) - q.select(1, j)) / hinv[j][j]);
    w -= err.unsqueeze(1) * hinv[j].unsqueeze(0);
    hinv -= hinv.select(1, j).unsqueeze(1) * hinv[j].unsqueeze(0) / hinv[j][j];
  }
  return q;
}

// A Linear [12, 32] with rows in mixed formats, and a Hessian of correlated inputs.
struct GptqCase {
  at::Tensor w, h, bits, group, leader;
  RowSpec spec;
  GptqCase() {
    at::manual_seed(17);
    w = at::randn({12, 32});
    const at::Tensor x = at::randn({200, 32}).matmul(at::randn({32, 32}) * 0.3 + at::eye(32));
    h = x.t().matmul(x);
    bits = at::tensor({2, 2, 3, 3, 4, 4, 8, 16, 2, 4, 3, 16}, at::kLong);
    group = at::tensor({8, 8, 16, 32, 8, 32, 32, 0, 32, 16, 16, 0}, at::kLong);
    leader = at::arange(12, at::kLong);
    spec = make_row_spec(w, bits, group, leader, h.diagonal(), QuantizerOptions{});
  }
};

TEST(Gptq, EqualsTheStraightforwardReferenceForMixedFormats) {
  GptqCase c;
  QuantizerOptions opt;
  const Quantized got = quantize_gptq(c.w, c.spec, gptq_factor(c.h, opt), /*block=*/8);
  const at::Tensor expected = reference_gptq(c.w, c.spec, c.h, opt.damp);
  EXPECT_LT(test::rel_error(got.values, expected), 1e-5);
  EXPECT_TRUE(at::equal(dequantize(got.codes, c.spec), got.values));
  // Blocking is an implementation detail.
  EXPECT_TRUE(at::allclose(quantize_gptq(c.w, c.spec, gptq_factor(c.h, opt), 128).values, got.values, 1e-5, 1e-6));
}

TEST(Gptq, WithAnIdentityHessianIsRoundToNearest) {
  GptqCase c;
  const Quantized g = quantize_gptq(c.w, c.spec, gptq_factor(at::eye(32), QuantizerOptions{}), 8);
  const Quantized r = quantize_nearest(c.w, c.spec);
  EXPECT_TRUE(at::equal(g.codes, r.codes));
  EXPECT_TRUE(at::equal(g.values, r.values));
}

TEST(Gptq, LowersTheOutputErrorBelowRoundToNearest) {
  GptqCase c;
  auto output_error = [&](const at::Tensor& q) {
    const at::Tensor d = (q - c.w).to(at::kDouble);
    return (d.matmul(c.h.to(at::kDouble)) * d).sum().item<double>();  // ‖ΔW X‖²
  };
  const Quantized g = quantize_gptq(c.w, c.spec, gptq_factor(c.h, QuantizerOptions{}), 8);
  EXPECT_LT(output_error(g.values), 0.8 * output_error(quantize_nearest(c.w, c.spec).values));
}

TEST(Gptq, RefinementLowersEveryRowsOutputErrorAndKeepsCodesAndValuesConsistent) {
  GptqCase c;
  auto row_error = [&](const at::Tensor& q) {
    const at::Tensor d = (q - c.w).to(at::kDouble);
    return (d.matmul(c.h.to(at::kDouble)) * d).sum(1);  // per row ‖Δ_r X‖²
  };
  const Quantized g = quantize_gptq(c.w, c.spec, gptq_factor(c.h, QuantizerOptions{}), 8);
  const Quantized r = refine_codes(c.w, c.spec, c.h, g, 4);
  EXPECT_TRUE(at::equal(dequantize(r.codes, c.spec), r.values));  // what pack stores is what was priced
  const at::Tensor before = row_error(g.values), after = row_error(r.values);
  EXPECT_TRUE((after <= before * (1 + 1e-5) + 1e-9).all().item<bool>()) << before << after;
  EXPECT_LT(after.sum().item<double>(), 0.97 * before.sum().item<double>());
  const at::Tensor full = (c.bits == 16).nonzero().reshape({-1});
  EXPECT_TRUE(at::equal(r.codes.index_select(0, full), g.codes.index_select(0, full)));  // fp16 rows untouched
  const at::Tensor coded = (c.bits <= 8).unsqueeze(1);
  const at::Tensor qmax = (at::pow(2.0, c.bits.clamp_max(8).to(at::kDouble)) - 1).to(at::kLong).unsqueeze(1);
  EXPECT_TRUE(at::logical_or(~coded, at::logical_and(r.codes >= 0, r.codes <= qmax)).all().item<bool>());
  // Rows are refined independently: a subset of rows alone gives the same rows.
  const at::Tensor some = at::tensor({0, 3, 4, 9}, at::kLong);
  const RowSpec sub{c.spec.bits.index_select(0, some), c.spec.group.index_select(0, some),
                    c.spec.scale.index_select(0, some), c.spec.zero.index_select(0, some)};
  const Quantized gs{g.codes.index_select(0, some), g.values.index_select(0, some)};
  EXPECT_TRUE(at::allclose(refine_codes(c.w.index_select(0, some), sub, c.h, gs, 4).values,
                           r.values.index_select(0, some), 1e-5, 1e-6));
  // Round-to-nearest refined moves toward GPTQ's error or below it.
  const Quantized rn = refine_codes(c.w, c.spec, c.h, quantize_nearest(c.w, c.spec), 4);
  EXPECT_LT(row_error(rn.values).sum().item<double>(), row_error(quantize_nearest(c.w, c.spec).values).sum().item<double>());
}

// Plans for a Linear of `out` rows: formats, row formats, leaders.
LinearPlan mixed_plan(std::int64_t out, std::int64_t in, std::uint64_t seed) {
  at::manual_seed(seed);
  LinearPlan lp;
  lp.formats = linear_formats(in, {2, 3, 4, 8, 16}, {8, in});
  lp.row_format = at::randint(0, static_cast<std::int64_t>(lp.formats.size()), {out}, at::kLong).to(at::kByte);
  lp.row_leader = at::arange(out, at::kLong);
  // Rows 1 and 2 follow row 0, row 5 follows row 4 (same formats, with scales).
  lp.row_format[0] = lp.row_format[1] = lp.row_format[2] = 1;
  lp.row_format[4] = lp.row_format[5] = 5;
  lp.row_leader[1] = lp.row_leader[2] = 0;
  lp.row_leader[5] = 4;
  return lp;
}

TEST(Packer, UnpackReproducesTheQuantizerExactlyWithFollowersOnTheirLeadersParameters) {
  const at::Tensor w = at::randn({20, 32});
  const at::Tensor x = at::randn({100, 32});
  const at::Tensor h = x.t().matmul(x);
  const LinearPlan lp = mixed_plan(20, 32, 3);
  QuantizerOptions refined;
  refined.refine_sweeps = 4;
  for (const auto& [hessian, opt] : {std::pair{at::Tensor(), QuantizerOptions{}}, {h, QuantizerOptions{}}, {h, refined}}) {
    const PackedLinear p = pack_linear(w, lp, hessian, opt);
    const QuantizedLinear q = quantize_linear(w, lp, hessian, opt);
    EXPECT_TRUE(at::equal(unpack_linear(p), q.q.values));
    EXPECT_EQ(p.followers, 3);
    EXPECT_TRUE(at::equal(q.spec.scale[1], q.spec.scale[0]));
    EXPECT_TRUE(at::equal(q.spec.zero[5], q.spec.zero[4]));
    const LinearLayout l = decode_layout(p, "test");
    EXPECT_TRUE(at::equal(l.row_format, lp.row_format.to(at::kLong)));
    EXPECT_TRUE(at::equal(l.row_leader, lp.row_leader));
    EXPECT_TRUE(at::equal(l.spec.scale, q.spec.scale.to(at::kHalf).to(at::kFloat)));
  }
}

TEST(Packer, StoredBitsAreExactlyWhatTheAccountingCounts) {
  for (std::uint64_t seed : {1, 2, 3}) {
    const at::Tensor w = at::randn({20, 40});
    const LinearPlan lp = mixed_plan(20, 40, seed);
    const PackedLinear p = pack_linear(w, lp, {}, QuantizerOptions{});
    EXPECT_EQ(linear_bits(20, 40, lp.formats, lp.row_format, lp.row_leader).total(), p.stored_bits()) << seed;
  }
  // One format: no row map at all; units add up to the Linear.
  LinearPlan one{0, 0, {Format{3, 8}}, at::zeros({20}, at::kByte), at::arange(20, at::kLong)};
  const PackedLinear p = pack_linear(at::randn({20, 40}), one, {}, QuantizerOptions{});
  EXPECT_EQ(p.row_format.numel(), 0);
  // shape, formats, per row 15 code bytes and 5 fp16 scales, 100 3-bit zero-points in one stream.
  EXPECT_EQ(p.stored_bits(), 8 * (3 * 8 + 2 * 4 + 20 * (15 + 5 * 2) + 38));
  const std::int64_t units = linear_fixed_bits(1) + 20 * unit_bits(1, 20, 40, 1, Format{3, 8}).total();
  EXPECT_GE(p.stored_bits() - units, 0);
  EXPECT_LT(p.stored_bits() - units, 8);  // the zero-point stream's padding
}

TEST(Packer, CorruptDatasetsAreRefusedNamingThem) {
  const PackedLinear good = pack_linear(at::randn({20, 32}), mixed_plan(20, 32, 5), {}, QuantizerOptions{});
  decode_layout(good, "L");
  PackedLinear p = good;
  p.codes = p.codes.slice(0, 1);
  EXPECT_CSAQ_ERROR(decode_layout(p, "L"), "L/codes");
  p = good;
  p.formats = p.formats.clone();
  p.formats[0][0] = 251;
  EXPECT_CSAQ_ERROR(decode_layout(p, "L"), "L/formats", "251 bits");
  p = good;
  p.scales = p.scales.clone();
  p.scales[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_CSAQ_ERROR(decode_layout(p, "L"), "L/scales");
  p = good;
  p.followers = 2;  // the pairs stream no longer matches
  EXPECT_CSAQ_ERROR(decode_layout(p, "L"), "L/follower_pairs");
  p = good;  // row 2 follows row 1, itself a follower
  p.follower_pairs = pack_bit_stream(at::tensor({1, 0, 2, 1, 5, 4}, at::kLong), at::full({6}, 5, at::kLong));
  EXPECT_CSAQ_ERROR(decode_layout(p, "L"), "a leader is itself a follower");
  p = good;
  p.zeros = at::cat({p.zeros, at::zeros({1}, at::kByte)});
  EXPECT_CSAQ_ERROR(decode_layout(p, "L"), "L/zeros");
}

// Random Linears with random salience and a few cliques, for solver tests; costs are the
// salience-weighted absolute error.
std::vector<LinearInput> random_linears(int layers, std::uint64_t seed) {
  at::manual_seed(seed);
  std::vector<LinearInput> out;
  for (int l = 0; l < layers; ++l)
    for (int i = 0; i < kNumLinears; ++i) {
      const std::int64_t rows = 8 + 4 * i, cols = 256;
      at::Tensor leader = at::arange(rows, at::kLong);
      leader[1] = 0;
      leader[2] = 0;
      const at::Tensor salience = at::rand({rows, cols}).pow(3);
      out.push_back({l, i, at::randn({rows, cols}), leader, {},
                     [salience](const at::Tensor& d, std::size_t) { return (salience * d.abs()).sum(1, false, at::kDouble); }});
    }
  return out;
}

TEST(Solver, AchievedBitsLieWithinOneUnitBelowTheTargetAndAreTheStoredBits) {
  LocalCommunicator comm;
  const auto linears = random_linears(2, 7);
  for (const std::vector<int>& opts : {std::vector<int>{2, 4, 8, 16}, {2, 3, 4}, {1, 2, 3, 4, 8}}) {
    for (double target : {2.8, 3.3, 3.75, 4.2}) {
      SolverOptions o;
      o.bit_options = opts;
      o.group_options = {64, 256};
      o.target_bits = target;
      const Plan plan = solve(linears, 2, comm, o);
      // One unit's granularity: a 3-row clique's biggest jump between options, plus padding.
      const std::int64_t largest_unit_step = 3 * 256 * (opts.back() - opts.front()) + 4 * 24 + kPaddingReserveBits * 14;
      const double budget = target * double(plan.summary.weights);
      EXPECT_LE(double(plan.summary.total_bits), budget) << target;
      EXPECT_GE(double(plan.summary.total_bits), budget - double(largest_unit_step)) << target << " " << opts.size();
      // The summary is a recount of what pack stores.
      std::int64_t weights = 0, stored = 0;
      for (const auto& lp : plan.linears) {
        weights += lp.row_format.numel() * 256;
        const auto& in = linears[static_cast<std::size_t>(lp.layer * kNumLinears + lp.linear)];
        stored += pack_linear(in.weight, lp, {}, o.quantizer).stored_bits();
      }
      EXPECT_EQ(weights, plan.summary.weights);
      EXPECT_EQ(stored, plan.summary.total_bits) << target;
    }
  }
}

TEST(Solver, SpendsTheBudgetEvenWhenTheCostModelPrefersFewerBits) {
  // A cost model that predicts gains from coarser rows (as a first-order term can): the plan
  // still comes within one unit of the target, adding the bits it predicts cost least.
  LocalCommunicator comm;
  auto linears = random_linears(1, 5);
  for (auto& in : linears) {
    const RowCost base = in.cost;
    in.cost = [base](const at::Tensor& d, std::size_t f) { return -base(d, f); };
  }
  SolverOptions o;
  o.bit_options = {2, 4, 8};
  o.group_options = {64};
  o.target_bits = 5.0;
  const Plan plan = solve(linears, 1, comm, o);
  EXPECT_LE(double(plan.summary.total_bits), 5.0 * double(plan.summary.weights));
  EXPECT_GE(double(plan.summary.total_bits), 5.0 * double(plan.summary.weights) - 3 * 256 * 6 - 4 * 24 - 7 * kPaddingReserveBits);
  EXPECT_LT(plan.summary.lambda, 0);
}

TEST(Solver, MoreSalientUnitsGetMoreBits) {
  LocalCommunicator comm;
  auto linears = random_linears(1, 3);
  const at::Tensor boost = at::ones({8, 1});
  boost[5] = 1000;  // row 5 matters most
  const RowCost base = linears[0].cost;
  linears[0].cost = [base, boost](const at::Tensor& d, std::size_t f) { return base(d, f) * boost.reshape({-1}); };
  SolverOptions o;
  o.bit_options = {2, 4, 8};
  o.group_options = {64};
  o.target_bits = 3.5;
  const Plan plan = solve(linears, 1, comm, o);
  const LinearPlan& lp = plan.linears[0];
  const at::Tensor fmt = lp.row_format.to(at::kLong);
  EXPECT_EQ(lp.formats[static_cast<std::size_t>(fmt[5].item<std::int64_t>())].bits, 8);
  EXPECT_TRUE(at::equal(fmt.slice(0, 0, 3), fmt[0].expand({3})));  // a clique shares its format
}

TEST(Solver, CostsAreOfTheRowsPackWillStore) {
  // Rows are independent: a row quantized alone in a format (as the solver prices it) is the
  // row pack stores in a plan of mixed formats.
  const at::Tensor w = at::randn({20, 32}), x = at::randn({100, 32});
  const at::Tensor h = x.t().matmul(x);
  const LinearPlan lp = mixed_plan(20, 32, 9);
  const QuantizedLinear mixed = quantize_linear(w, lp, h, QuantizerOptions{});
  for_each_format(w, lp.row_leader, h, lp.formats, QuantizerOptions{}, [&](std::size_t f, const Quantized& q) {
    const at::Tensor rows = (lp.row_format.to(at::kLong) == static_cast<std::int64_t>(f)).nonzero().reshape({-1});
    EXPECT_TRUE(at::allclose(q.values.index_select(0, rows), mixed.q.values.index_select(0, rows), 1e-5, 1e-6)) << f;
  });
}

TEST(Solver, ThresholdAndUniformStayWithinBudget) {
  LocalCommunicator comm;
  const auto linears = random_linears(2, 11);
  for (SolverKind kind : {SolverKind::kThreshold, SolverKind::kUniform}) {
    SolverOptions o;
    o.kind = kind;
    o.bit_options = {2, 3, 4, 8};
    o.group_options = {64};
    o.target_bits = 4.0;
    const Plan plan = solve(linears, 2, comm, o);
    EXPECT_LE(double(plan.summary.total_bits), 4.0 * double(plan.summary.weights));
    if (kind == SolverKind::kUniform) {
      std::int64_t used = 0;
      for (const auto& [b, n] : plan.summary.histogram) used += n > 0;
      EXPECT_EQ(used, 1);  // one width for everything, and no row maps
      for (const auto& lp : plan.linears) EXPECT_EQ(lp.formats.size(), 1u);
      EXPECT_EQ(plan.linears[0].formats[0], (Format{3, 64}));  // 4 bits and scales exceed 4.0
    }
  }
  SolverOptions o;
  o.kind = SolverKind::kThreshold;
  o.group_options = {32, 64};
  EXPECT_CSAQ_ERROR(solve(linears, 2, comm, o), "--solver threshold takes one group option");
}

TEST(Solver, ABudgetBelowTheSmallestOptionIsAnError) {
  LocalCommunicator comm;
  SolverOptions o;
  o.bit_options = {2, 4};
  o.group_options = {64};
  o.target_bits = 2.1;  // 2-bit codes plus scales and zero-points exceed it
  EXPECT_CSAQ_ERROR(solve(random_linears(1, 1), 1, comm, o), "--target-bits 2.1 is unreachable");
}

TEST(Solver, UnreachableTargetsAreRefusedUpFront) {
  SolverOptions o;
  o.bit_options = {2, 4};
  o.group_options = {128};
  o.target_bits = 2.0;  // codes alone take 2 bits; scales and maps push the minimum above
  EXPECT_CSAQ_ERROR(check_target_reachable({{256, 1024}}, o), "--target-bits 2 is unreachable", "cannot go below");
  o.target_bits = 4.5;
  EXPECT_CSAQ_ERROR(check_target_reachable({{256, 1024}}, o), "cannot exceed");
  o.target_bits = 3.0;
  check_target_reachable({{256, 1024}}, o);
  EXPECT_CSAQ_ERROR(parse_bit_options("2,5"), "5 is not one of");
  EXPECT_EQ(parse_bit_options("8,2,4"), (std::vector<int>{2, 4, 8}));
  EXPECT_EQ(parse_group_options("128,-1,32"), (std::vector<std::int64_t>{-1, 32, 128}));
  EXPECT_CSAQ_ERROR(parse_group_options("0"), "--group-options: 0");
}

TEST(Solver, UniformWithASingleBitOptionTakesItAtAnyBudgetItFits) {
  // --method gptq --bit-options 4 (one width) at its own total, above it and far above it
  // takes that width; below its total it is refused up front, naming the bound.
  LocalCommunicator comm;
  const auto linears = random_linears(2, 11);
  std::vector<std::pair<std::int64_t, std::int64_t>> shapes;
  for (const auto& in : linears) shapes.emplace_back(in.weight.size(0), in.weight.size(1));
  for (int bits : {2, 3, 4, 8, 16})
    for (std::int64_t group : {std::int64_t{32}, std::int64_t{128}, std::int64_t{-1}}) {
      SCOPED_TRACE("bits " + std::to_string(bits) + " group " + std::to_string(group));
      SolverOptions o;
      o.kind = SolverKind::kUniform;
      o.bit_options = {bits};
      o.group_options = {group};
      o.target_bits = 17.0;
      check_target_reachable(shapes, o);
      const Plan wide = solve(linears, 2, comm, o);
      const double own = double(wide.summary.total_bits) / double(wide.summary.weights);
      EXPECT_GE(own, double(bits));
      for (double target : {own + 1e-9, own + 0.3, 17.0}) {
        o.target_bits = target;
        check_target_reachable(shapes, o);
        const Plan plan = solve(linears, 2, comm, o);
        EXPECT_EQ(plan.summary.total_bits, wide.summary.total_bits) << target;
        for (const auto& lp : plan.linears) EXPECT_EQ(lp.formats.size(), 1u);
        EXPECT_EQ(plan.linears[0].formats[0].bits, bits);
      }
      if (bits < 16) {
        o.target_bits = own - 0.01;
        EXPECT_CSAQ_ERROR(check_target_reachable(shapes, o), "cannot go below");
      }
    }
}

}  // namespace
}  // namespace csaq
