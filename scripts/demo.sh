#!/usr/bin/env bash
# Builds csaq, writes a small random Llama checkpoint with a byte-level tokenizer and some
# generated text (demo/), quantizes it to 4.0 bits per weight calibrating on demo/calib.txt
# with its layers sharded over 2 MPI ranks, and compares it with the original on
# demo/heldout.txt (perplexity of both, KL divergence, top-1 agreement); first, what csaq
# plan says the run will need. No downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja
cmake --build build --target csaq
if [ "$(id -u)" -eq 0 ]; then  # Open MPI refuses root unless told
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
csaq="mpirun -np 2 ./build/launcher/csaq"
[ -f demo/config.json ] || ./build/launcher/csaq make-demo --out demo
# What the run will need, per rank, before it starts (docs/planning.md).
./build/launcher/csaq plan --model demo --samples 32 --seq-len 256 --target-bits 4.0 --world-size 2 | sed -n '1,7p'
$csaq quantize --model demo --calib demo/calib.txt --samples 32 --seq-len 256 \
  --target-bits 4.0 --out demo/demo-csaq.h5 --report demo/quantize-report.json --overwrite
# Held-out text through the quantized and the original model together: perplexity of both,
# and how far the quantized model's predictions moved (KL from the original, top-1 agreement).
$csaq eval --quantized demo/demo-csaq.h5 --reference demo --data demo/heldout.txt --seq-len 256 \
  --report demo/eval-report.json --overwrite
./build/launcher/csaq inspect demo/demo-csaq.h5 | tail -5
echo "reports: demo/quantize-report.json demo/eval-report.json"
echo "(the demo model's weights are random: its perplexity means little; the KL divergence and top-1"
echo " agreement say how much of the original model's behaviour quantization kept)"
