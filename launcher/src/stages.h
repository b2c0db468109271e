// Options and helpers the stage commands (quantize, profile, solve, pack, check-costs) share.
#pragma once

#include <boost/program_options.hpp>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "csaq/profiler/profiler.h"
#include "csaq/solver/solver.h"

namespace csaq::cli {

// The formats a run may choose from and the quantizer that makes them.
struct FormatArgs {
  std::string bit_options = "2,3,4,8", group_options = "32,128", quantizer = "gptq";
  void add(boost::program_options::options_description& o);
  // Sets the formats and the quantizer of `s`; throws UsageError on bad values.
  void apply(SolverOptions& s) const;
};

nlohmann::json quantizer_json(const QuantizerOptions& q, bool hessian);
QuantizerOptions quantizer_from_json(const nlohmann::json& j);

// The (bits, group option) pairs of the options, in the order reports and the
// post-quantization integral use; and, for a Linear with `in` inputs, the first pair that
// gives each of its formats.
std::vector<std::pair<int, std::int64_t>> option_pairs(const SolverOptions& s);
std::vector<std::size_t> pair_of_format(const std::vector<Format>& formats, std::int64_t in, const SolverOptions& s);

// A profiler restored from a salience file written by csaq profile (checked against the
// model), ranking by `kind`.
std::unique_ptr<Profiler> load_profile(const std::string& path, const ModelShard& model, Communicator& comm,
                                       SalienceKind kind);

}  // namespace csaq::cli
