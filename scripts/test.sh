#!/usr/bin/env bash
# Configures, builds and runs every test (GoogleTest through CTest; the multi-rank suites
# under mpiexec with 2 and 3 ranks). Tests that need ../shared skip, saying so, without it;
# point at another copy with CSAQ_SHARED_DIR=/path/to/shared.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCSAQ_BUILD_TESTS=ON ${CSAQ_SHARED_DIR:+-DCSAQ_SHARED_DIR="$CSAQ_SHARED_DIR"}
cmake --build build
ctest --test-dir build --output-on-failure
