#!/usr/bin/env bash
# The calibration-pass benchmark: csaq profile (1 and 2 ranks) and csaq eval against a PyTorch
# eager reference on the same cores, on random-weight Llama checkpoints of two shapes. Results
# (Markdown tables on stdout, every measurement in bench/out/results.json) are explained in
# docs/performance.md. Needs the build in build/ and Debian's python3-torch (installed here
# when missing). Options go to bench/run.py (--shapes, --threads, --seq-len, --out, --ranks);
# `bench/run.sh --smoke` runs a tiny shape only, to check the benchmark itself works.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! /usr/bin/python3 -c 'import torch, numpy' 2>/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update
  $SUDO apt-get install -y --no-install-recommends python3-torch python3-numpy
fi
[ -x build/launcher/csaq ] || { echo "bench: build csaq first (cmake -S . -B build -G Ninja && cmake --build build)" >&2; exit 1; }
if [ "${1:-}" = "--smoke" ]; then
  shift
  exec /usr/bin/python3 bench/run.py --shapes smoke --seq-len 64 --out "${TMPDIR:-/tmp}/csaq-bench-smoke" "$@"
fi
exec /usr/bin/python3 bench/run.py "$@"
