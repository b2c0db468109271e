#!/usr/bin/env bash
# Builds csaq, writes a small random Llama checkpoint (demo/) and evaluates its perplexity
# with the layers sharded over 2 MPI ranks. No downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCSAQ_BUILD_TESTS=OFF
cmake --build build --target csaq
if [ "$(id -u)" -eq 0 ]; then  # Open MPI refuses root unless told
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
[ -f demo/config.json ] || ./build/launcher/csaq make-demo --out demo
mpirun -np 2 ./build/launcher/csaq eval --model demo --data demo/tokens.npy --seq-len 256 \
  --report demo/eval-report.json --overwrite
echo "report: demo/eval-report.json"
