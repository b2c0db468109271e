// csaq: causal-salience-aware post-training quantization of LLMs across MPI ranks.
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/version.h>

#include <boost/program_options/errors.hpp>
#include <nlohmann/json.hpp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unistd.h>
#include <iostream>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#ifdef CSAQ_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "calibration_checkpoint.h"
#include "commands.h"
#include "usage.h"
#include "csaq/packer/checkpoint.h"
#include "csaq/shard/model.h"
#include "csaq/storage/error.h"

namespace {

const char* kUsage =
    "usage: csaq <command> [options]\n"
    "\n"
    "commands:\n"
    "  quantize   calibrate, choose bits per weight and write a quantized checkpoint\n"
    "  profile    stage 1 alone: calibrate and write a salience file\n"
    "  solve      stage 2 alone: bits per weight for a budget, from a salience file\n"
    "  pack       stage 3 alone: quantize by a plan file and write the checkpoint\n"
    "  eval       perplexity of a model (or of a quantized checkpoint) on a token file\n"
    "  export     write a quantized checkpoint as a dequantized Hugging Face model\n"
    "  inspect    summarize a quantized checkpoint\n"
    "  check-costs  how well each cost model predicts the loss change of quantizing a unit\n"
    "  plan       memory per rank, disk and time of a run, from config.json alone; the world size that fits\n"
    "  make-demo  write a small random Llama checkpoint and token file (no downloads)\n"
    "\n"
    "Run under mpirun/srun to shard the model's layers across ranks.\n"
    "'csaq <command> --help' lists a command's options; 'csaq --version' prints the version.\n";

}  // namespace

namespace csaq::cli {
namespace po = boost::program_options;

void check_outputs(Communicator& comm, const std::vector<storage::NamedPath>& outputs,
                   const std::vector<storage::NamedPath>& inputs, bool overwrite) {
  decide_on_rank0(comm, [&] { storage::check_outputs(outputs, inputs, overwrite); });
}

ModelConfig model_config(const std::string& model_dir, const Communicator& comm) {
  std::vector<std::string> unused;
  ModelConfig config = load_model_config(model_dir, &unused);
  if (comm.rank() == 0 && !unused.empty()) {
    std::string names;
    for (std::size_t i = 0; i < unused.size() && i < 5; ++i) names += (i ? ", " : "") + unused[i];
    std::fprintf(stderr, "csaq: warning: %zu tensor(s) of '%s' are not part of the model config.json describes and are left out: %s%s\n",
                 unused.size(), model_dir.c_str(), names.c_str(), unused.size() > 5 ? ", ..." : "");
  }
  return config;
}

void warn_if_beyond_positions(const ModelConfig& config, std::int64_t seq_len, const Communicator& comm) {
  if (comm.rank() == 0 && config.max_position_embeddings > 0 && seq_len > config.max_position_embeddings)
    std::fprintf(stderr, "csaq: warning: --seq-len %lld exceeds the model's max_position_embeddings %lld; positions "
                 "beyond it were never trained\n", static_cast<long long>(seq_len),
                 static_cast<long long>(config.max_position_embeddings));
}

bool parse_options(const std::string& command, po::options_description& options,
                   const std::vector<std::string>& args, po::variables_map& vm,
                   const Communicator& comm) {
  options.add_options()("help,h", "show this help");
  po::store(po::command_line_parser(args).options(options).run(), vm);
  if (vm.count("help")) {
    if (comm.rank() == 0) std::cout << "usage: csaq " << command << " [options]\n\n" << options;
    return false;
  }
  po::notify(vm);
  return true;
}

at::ScalarType checkpoint_dtype(const ModelConfig& c) {
  const auto j = nlohmann::json::parse(c.json_text);
  const at::ScalarType t = dtype_from_name(j.value("torch_dtype", j.value("dtype", std::string("float32"))));
  return t == at::ScalarType::Undefined ? at::kFloat : t;
}

at::ScalarType compute_dtype(const std::string& name) {
#ifdef CSAQ_WITH_CUDA
  constexpr bool kHalfKernels = true;
#else
  constexpr bool kHalfKernels = false;
#endif
  // The model's layers compute on the CPU in every build so far: float32 there, the exact
  // choice and never a slow one (how fast CPU bfloat16 products are depends on the CPU's
  // native support; float16 has none; docs/performance.md). Once layers compute on a GPU,
  // `auto` there is the checkpoint's own dtype (checkpoint_dtype), the fast one.
  if (name == "auto") return at::kFloat;
  const at::ScalarType t = dtype_from_name(name);
  if (t == at::ScalarType::Undefined)
    throw UsageError{"--dtype must be auto, float32, bfloat16 or float16, not '" + name + "'"};
  if (t == at::kHalf && !kHalfKernels)
    throw UsageError{"--dtype float16 needs a CUDA build (CPU matrix products have no float16 kernels)"};
  return t;
}

void set_threads(int requested, const Communicator& comm) {
  int n = requested;
  if (n <= 0) {
    const int cores = static_cast<int>(std::thread::hardware_concurrency());
    n = std::max(1, cores / std::max(1, comm.local_size()));
  }
  at::set_num_threads(n);
  // OpenBLAS keeps its own thread pool (the pthread build ignores OpenMP's setting): the
  // same count, so that ranks sharing a node do not oversubscribe its cores.
  using SetThreads = void (*)(int);
  if (auto set_blas = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) set_blas(n);
  // OpenBLAS's pthread build spins its own threads next to LibTorch's OpenMP ones: 3x slower
  // with 2 threads on 2 cores (docs/performance.md). Its OpenMP build shares one pool.
  using GetParallel = int (*)();
  auto parallel = reinterpret_cast<GetParallel>(dlsym(RTLD_DEFAULT, "openblas_get_parallel"));
  if (n > 1 && parallel != nullptr && parallel() == 1 && comm.rank() == 0)
    std::fprintf(stderr, "csaq: warning: the BLAS in use is OpenBLAS's pthread build, whose threads compete with "
                 "LibTorch's OpenMP threads (about 3x slower with %d threads); use its OpenMP build: apt-get install "
                 "libopenblas0-openmp and update-alternatives --set libblas.so.3-x86_64-linux-gnu "
                 "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3 (scripts/install-deps.sh does both)\n", n);
}
}  // namespace csaq::cli

int main(int argc, char** argv) {
  std::unique_ptr<csaq::MpiRuntime> mpi;
  std::unique_ptr<csaq::Communicator> comm;
  try {
    mpi = std::make_unique<csaq::MpiRuntime>(&argc, &argv);
    comm = mpi->world();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "csaq: error: %s\n", e.what());
    return 1;
  }
  const int rank = comm->rank(), world = comm->size();
  // Under SLURM, srun starts SLURM_NTASKS tasks; an Open MPI without PMI support would make
  // each its own world of one, all doing the same work. Refuse that at once.
  if (const char* ntasks = std::getenv("SLURM_NTASKS"); ntasks != nullptr && std::atoi(ntasks) != world &&
                                                        std::getenv("CSAQ_IGNORE_SLURM_NTASKS") == nullptr) {
    if (rank == 0)
      std::fprintf(stderr,
                   "csaq: error: SLURM_NTASKS=%s but the MPI world has %d rank(s): launch with 'srun --mpi=pmix' "
                   "(or pmi2) so that the tasks form one MPI job\n",
                   ntasks, world);
    return 1;
  }
#ifdef CSAQ_WITH_CUDA
  // One GPU per rank, chosen by the rank's index among the ranks on its node.
  if (c10::cuda::device_count() > 0)
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(comm->local_rank() % c10::cuda::device_count()));
#endif
  if (const char* dir = std::getenv("CSAQ_TEST_PID_DIR")) {  // test hook: lets a test kill one rank
    if (FILE* f = std::fopen((std::string(dir) + "/rank-" + std::to_string(rank) + ".pid").c_str(), "w")) {
      std::fprintf(f, "%d\n", static_cast<int>(getpid()));
      std::fclose(f);
    }
  }
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    if (rank == 0) std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  if (command == "--version") {
    if (rank == 0) {
      csaq::cli::set_threads(0, *comm);
      std::printf("csaq %s\nLibTorch %s, BLAS: %s\nthreads per rank: %d (cores %u, ranks on this node %d)\n",
                  CSAQ_VERSION, TORCH_VERSION, csaq::cli::blas_description().c_str(), at::get_num_threads(),
                  std::thread::hardware_concurrency(), comm->local_size());
    }
    return 0;
  }
  const std::vector<std::string> args(argv + 2, argv + argc);
  csaq::cli::record_start_of_run();
  try {
    if (command == "eval") return csaq::cli::run_eval(args, *comm);
    if (command == "make-demo") return csaq::cli::run_make_demo(args, *comm);
    if (command == "quantize") return csaq::cli::run_quantize(args, *comm);
    if (command == "profile") return csaq::cli::run_profile(args, *comm);
    if (command == "solve") return csaq::cli::run_solve(args, *comm);
    if (command == "pack") return csaq::cli::run_pack(args, *comm);
    if (command == "export") return csaq::cli::run_export(args, *comm);
    if (command == "inspect") return csaq::cli::run_inspect(args, *comm);
    if (command == "check-costs") return csaq::cli::run_check_costs(args, *comm);
    if (command == "plan") return csaq::cli::run_plan(args, *comm);
    throw csaq::cli::UsageError{"unknown command '" + command + "'"};
  } catch (const csaq::cli::Preempted& p) {
    if (rank == 0)
      std::fprintf(stderr, "csaq %s: preempted: calibration checkpoint %s committed; rerun the same command "
                   "(--resume auto) to continue (exit status %d)\n", command.c_str(), p.checkpoint.c_str(),
                   csaq::cli::kPreemptedExitCode);
    return csaq::cli::kPreemptedExitCode;
  } catch (const csaq::cli::UsageError& e) {
    // Every rank sees the same command line: one message, every rank exits.
    if (rank == 0) std::fprintf(stderr, "csaq %s: %s\n\n%s", command.c_str(), e.message.c_str(), kUsage);
    return 2;
  } catch (const boost::program_options::error& e) {
    if (rank == 0)
      std::fprintf(stderr, "csaq %s: %s (see 'csaq %s --help')\n", command.c_str(), e.what(), command.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "csaq %s: error on rank %d of %d: %s\n", command.c_str(), rank, world, e.what());
    std::fflush(stderr);
    std::fflush(stdout);
    // Other ranks may be waiting on this one in a send/recv or collective: end them all.
    if (world > 1) csaq::MpiRuntime::abort(1);
    // Alone: end without MPI_Finalize, whose library shutdown would close files a failed write
    // left broken (HDF5 crashes doing so). Stack unwinding has already removed temporaries.
    std::_Exit(1);
  }
}
