// The MPI world communicator of a test binary built with mpi_main.cpp.
#pragma once

#include "csaq/shard/comm.h"

namespace csaq::test {
Communicator& world();
}
