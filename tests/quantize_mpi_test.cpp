// QuantizeRun under mpirun with 2 and 3 ranks: the whole quantize flow distributed must give
// exactly what one process gives: salience, early-stop decisions, plans and checkpoint
// datasets.
#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <fstream>

#include "csaq/packer/checkpoint.h"
#include "csaq/profiler/profiler.h"
#include "csaq/solver/solver.h"
#include "csaq/storage/error.h"
#include "csaq/storage/h5.h"
#include "h5_compare.h"
#include "mpi_world.h"
#include "support.h"

namespace csaq {
namespace {

struct QuantizeRun {
  std::unique_ptr<Profiler> profiler;
  Plan plan;
  LossTotals totals;
  double agreement = 0;
};

ModelConfig small_config() {
  return ModelConfig::parse(
      R"({"model_type":"qwen2","vocab_size":96,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":3,
          "num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-6,"rope_theta":1000000.0})",
      "test config");
}

QuantizeRun quantize(const ModelShard& model, Communicator& comm) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(42);
  TokenSequences data(at::randint(96, {24 * 16}, gen, at::kLong), 16, -1, "random tokens");
  ProfilerOptions popt;
  popt.candidates = 16;
  popt.fire_fraction = 0.25;
  popt.check_every = 4;
  popt.min_sequences = 8;
  popt.rho = 0.995;
  popt.sample_per_linear = 64;
  QuantizeRun run;
  run.profiler = std::make_unique<Profiler>(model, comm, popt);
  run.totals = Pipeline(model, comm, PipelineOptions{2, 2})
                   .calibrate(data, run.profiler->gradient_callback(), &run.profiler->observer(), {}, {},
                              run.profiler->round_callback());
  std::vector<LinearInput> inputs;
  const Profiler* p = run.profiler.get();
  for (const DecoderLayer& layer : model.decoder())
    for (int i = 0; i < kNumLinears; ++i)
      inputs.push_back({layer.index, i, layer.linears[i].weight.detach(), p->row_leaders(layer.index, i, 0.5),
                        [p, l = layer.index, i] { return p->linear_hessian(l, i); },
                        [p, l = layer.index, i](const at::Tensor& d, std::size_t f) {
                          return p->row_cost(l, i, SalienceKind::kTaylor, d, f);
                        }});
  SolverOptions sopt;
  sopt.bit_options = {2, 3, 4, 8};
  sopt.group_options = {16, 32};
  sopt.target_bits = 4.6;
  run.plan = solve(inputs, model.config().num_layers, comm, sopt);
  run.agreement = top_fraction_agreement(*run.profiler, SalienceKind::kCausal, SalienceKind::kActivation, 0.05, comm);
  return run;
}

// Rank 0's temporary directory, known to every rank.
std::string shared_temp_dir(Communicator& comm) {
  std::string dir;
  if (comm.rank() == 0) {
    std::string tmpl = (std::filesystem::temp_directory_path() / "csaq-mpi-XXXXXX").string();
    dir = ::mkdtemp(tmpl.data());
  }
  return broadcast_string(comm, dir);
}

TEST(MpiQuantize, DistributedRunEqualsOneProcessUpToTheCheckpointBytes) {
  Communicator& w = test::world();
  const ModelConfig c = small_config();
  auto weights = random_model_weights(c, 9);
  std::map<std::string, at::Tensor> map(weights.begin(), weights.end());
  // Channels that fire together: rows 1-3 of every gate_proj repeat row 0 (scaled).
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    at::Tensor& g = map[hf_linear_name(l, 4)];
    for (int r = 1; r <= 3; ++r) g[r].copy_(g[0] * (1.0 + 0.1 * r));
  }
  ModelShard dist_model(c, w.rank(), w.size(), map_source(map, "'mem'"));
  LocalCommunicator local;
  ModelShard whole(c, 0, 1, map_source(map, "'mem'"));
  const QuantizeRun dist = quantize(dist_model, w);
  const QuantizeRun single = quantize(whole, local);

  EXPECT_EQ(dist.totals.sequences, single.totals.sequences);
  EXPECT_GE(single.profiler->early_stop_checks().size(), 2u) << "the test must exercise early stopping";
  std::int64_t followers = 0;
  for (const auto& lp : single.plan.linears)
    followers += (lp.row_leader != at::arange(lp.row_leader.size(0), at::kLong)).sum().item<std::int64_t>();
  EXPECT_GT(followers, 0) << "the test must exercise cliques";
  ASSERT_EQ(dist.profiler->early_stop_checks().size(), single.profiler->early_stop_checks().size());
  for (std::size_t i = 0; i < dist.profiler->early_stop_checks().size(); ++i)
    EXPECT_EQ(dist.profiler->early_stop_checks()[i].rho, single.profiler->early_stop_checks()[i].rho);
  EXPECT_EQ(dist.agreement, single.agreement);
  for (const auto& s : dist.profiler->stats()) {
    const LinearStats& ref = single.profiler->stats(s.layer, s.linear);
    EXPECT_TRUE(at::equal(s.causal, ref.causal));
    EXPECT_TRUE(at::equal(s.grad_sum, ref.grad_sum));
    EXPECT_TRUE(at::equal(s.out_grad_sq, ref.out_grad_sq));
    EXPECT_TRUE(at::equal(s.coact.counts(), ref.coact.counts()));
    EXPECT_TRUE(at::equal(dist.profiler->linear_hessian(s.layer, s.linear), single.profiler->linear_hessian(s.layer, s.linear)));
  }
  EXPECT_EQ(dist.plan.summary.total_bits, single.plan.summary.total_bits);
  EXPECT_EQ(dist.plan.summary.payload_bits, single.plan.summary.payload_bits);
  EXPECT_EQ(dist.plan.summary.lambda, single.plan.summary.lambda);
  ASSERT_EQ(dist.plan.linears.size(), static_cast<std::size_t>(dist_model.layers().size() * kNumLinears));
  for (const auto& lp : dist.plan.linears) {
    const auto& ref = single.plan.linears[static_cast<std::size_t>(lp.layer * kNumLinears + lp.linear)];
    EXPECT_TRUE(at::equal(lp.row_format, ref.row_format)) << lp.layer << "/" << lp.linear;
    EXPECT_TRUE(at::equal(lp.row_leader, ref.row_leader)) << lp.layer << "/" << lp.linear;
  }

  const std::string dir = shared_temp_dir(w);
  const std::vector<ModelFile> files{{"tokenizer.json", R"({"model": {"type": "BPE"}})"}, {"merges.txt", ""}};
  auto hessians = [](const QuantizeRun& run) -> HessianOf {
    const Profiler* p = run.profiler.get();
    return [p](std::int64_t l, int i) { return p->linear_hessian(l, i); };
  };
  write_checkpoint(dir + "/dist.h5", dist_model, dist.plan, hessians(dist), {}, "{}", at::kFloat, files, w, false);
  if (w.rank() == 0) {
    write_checkpoint(dir + "/single.h5", whole, single.plan, hessians(single), {}, "{}", at::kFloat, files, local, false);
    const storage::H5File a = storage::H5File::open_read(dir + "/dist.h5");
    const storage::H5File b = storage::H5File::open_read(dir + "/single.h5");
    int compared = 0;
    test::expect_same_datasets(a, b, "", compared);
    EXPECT_GT(compared, 3 * kNumLinears * 7);
    // And the checkpoint stands for what the plan says, in exactly the bits the solver counted.
    const QuantizedCheckpoint ckpt(dir + "/dist.h5");
    std::int64_t stored = 0;
    for (const auto& lp : single.plan.linears) {
      const at::Tensor w_lp = whole.decoder()[lp.layer].linears[lp.linear].weight;
      const at::Tensor h = single.profiler->linear_hessian(lp.layer, lp.linear);
      EXPECT_TRUE(at::equal(ckpt.tensor(hf_linear_name(lp.layer, lp.linear)),
                            quantize_linear(w_lp, lp, h, QuantizerOptions{}).q.values));
      stored += ckpt.linear(lp.layer, lp.linear).stored_bits();
    }
    EXPECT_EQ(stored, single.plan.summary.total_bits);
    const auto kept = ckpt.model_files();
    ASSERT_EQ(kept.size(), 2u);
    EXPECT_EQ(kept[0].name, "merges.txt");
    EXPECT_EQ(kept[0].bytes, "");
    EXPECT_EQ(kept[1].name, "tokenizer.json");
    EXPECT_EQ(kept[1].bytes, files[0].bytes);
    std::filesystem::remove_all(dir);
  }
  w.barrier();
}

TEST(MpiQuantize, ExistingOutputIsRefusedOnEveryRank) {
  Communicator& w = test::world();
  const ModelConfig c = small_config();
  auto weights = random_model_weights(c, 9);
  std::map<std::string, at::Tensor> map(weights.begin(), weights.end());
  ModelShard model(c, w.rank(), w.size(), map_source(map, "'mem'"));
  const std::string dir = shared_temp_dir(w);
  if (w.rank() == 0) std::ofstream(dir + "/out.h5") << "precious";
  w.barrier();
  Plan empty;
  EXPECT_CSAQ_ERROR(write_checkpoint(dir + "/out.h5", model, empty, {}, {}, "{}", at::kFloat, {}, w, false), "already exists",
                    "--overwrite");
  w.barrier();
  if (w.rank() == 0) {
    std::ifstream in(dir + "/out.h5");
    EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), "precious");
    std::filesystem::remove_all(dir);
  }
}

}  // namespace
}  // namespace csaq
