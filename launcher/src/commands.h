// Subcommands of the csaq executable. Each parses its own options (Boost.Program_options)
// and returns the process exit code; errors are thrown as csaq::Error and reported by main.
#pragma once

#include <boost/program_options.hpp>
#include <string>
#include <vector>

#include "csaq/shard/comm.h"
#include "csaq/shard/config.h"
#include "csaq/storage/files.h"

namespace csaq::cli {

// Thrown for a bad command line: main prints it (rank 0 only) with the usage hint, exit 2.
struct UsageError {
  std::string message;
};

int run_eval(const std::vector<std::string>& args, Communicator& comm);
int run_make_demo(const std::vector<std::string>& args, Communicator& comm);
int run_quantize(const std::vector<std::string>& args, Communicator& comm);
int run_profile(const std::vector<std::string>& args, Communicator& comm);
int run_solve(const std::vector<std::string>& args, Communicator& comm);
int run_pack(const std::vector<std::string>& args, Communicator& comm);
int run_export(const std::vector<std::string>& args, Communicator& comm);
int run_inspect(const std::vector<std::string>& args, Communicator& comm);
int run_check_costs(const std::vector<std::string>& args, Communicator& comm);
int run_plan(const std::vector<std::string>& args, Communicator& comm);

// Parses `args` against `options` (plus --help) into `vm`. Returns false after printing
// the help text (rank 0), when the caller should exit 0. Unknown options throw.
bool parse_options(const std::string& command, boost::program_options::options_description& options,
                   const std::vector<std::string>& args, boost::program_options::variables_map& vm,
                   const Communicator& comm);

// storage::check_outputs, decided on rank 0 for every rank, so that all stop with the same
// message before any work (report files are rank 0's to write).
void check_outputs(Communicator& comm, const std::vector<storage::NamedPath>& outputs,
                   const std::vector<storage::NamedPath>& inputs, bool overwrite);

// load_model_config, warning on rank 0 about tensors of the files the config does not use.
ModelConfig model_config(const std::string& model_dir, const Communicator& comm);
// Warns on rank 0 when `seq_len` exceeds the model's max_position_embeddings.
void warn_if_beyond_positions(const ModelConfig& config, std::int64_t seq_len, const Communicator& comm);

// The dtype a checkpoint stores its weights in (config.json torch_dtype / dtype; float32
// when absent).
at::ScalarType checkpoint_dtype(const ModelConfig& config);
// --dtype: float32, bfloat16, float16 (CUDA builds only: CPU matrix products have no float16
// kernels), or auto (float32 while the layers compute on the CPU).
at::ScalarType compute_dtype(const std::string& name);

// Sets LibTorch's intra-op threads: `requested`, or when 0 this node's cores shared
// evenly between the ranks on it.
void set_threads(int requested, const Communicator& comm);

}  // namespace csaq::cli
