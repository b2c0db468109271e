#!/usr/bin/env bash
# Reproduces the README's quality table: tinystories-656k calibrated on tinystories-calib.npy,
# perplexity on tinystories-heldout.npy (seq-len 512), FP32 vs round-to-nearest vs the
# activation-proxy (AWQ-style) allocation vs csaq, at 4.0 and 3.0 total bits per weight.
# Usage: scripts/tinystories-table.sh [SHARED_DIR] [RANKS]   (after building into build/)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
ranks=${2:-1}
csaq="./build/launcher/csaq"
[ "$(id -u)" -ne 0 ] || export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
run="mpirun -np $ranks --oversubscribe $csaq"
model=$shared/models/tinystories-656k
calib=$shared/data/tinystories-calib.npy
heldout=$shared/data/tinystories-heldout.npy
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
ppl() { $run eval "$@" --data "$heldout" --seq-len 512 2>/dev/null | sed -n 's/^perplexity: //p'; }
bits() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('%.3f' % r['bits']['total_per_weight'])" "$1"; }

echo "| method | target total bits | achieved total bits | perplexity |"
echo "| --- | --- | --- | --- |"
echo "| FP32 | 32 | 32 | $(ppl --model "$model") |"
for target in 4.0 3.0; do
  for variant in rtn activation csaq; do
    case $variant in
      rtn) flags="--method rtn" ;;
      activation) flags="--salience activation --calib $calib --seq-len 512" ;;
      csaq) flags="--calib $calib --seq-len 512" ;;
    esac
    $run quantize --model "$model" --target-bits $target --bit-options 2,3,4,8 $flags \
      --out "$out/$variant-$target.h5" --report "$out/$variant-$target.json" >/dev/null 2>&1
    echo "| $variant | $target | $(bits "$out/$variant-$target.json") | $(ppl --quantized "$out/$variant-$target.h5") |"
  done
done
python3 -c "import json,sys; print('agreement_top5 (causal vs activation, csaq at 4.0): %.3f' % json.load(open(sys.argv[1]))['agreement_top5'])" "$out/csaq-4.0.json"
