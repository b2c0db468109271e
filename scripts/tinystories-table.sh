#!/usr/bin/env bash
# Reproduces the README's quality table: tinystories-656k calibrated on tinystories-calib.npy,
# evaluated on tinystories-heldout.npy (seq-len 512) against the FP32 original: mean KL(P_fp32 ||
# P_quantized) per predicted token, top-1 agreement and perplexity. Rows: csaq's default
# (--objective fidelity), csaq --objective calibration-loss (the previous default), the
# activation-proxy (AWQ-style) allocation, uniform GPTQ and uniform round-to-nearest at 4.0, 3.0
# and 2.5 total bits per weight (the uniform methods take the widest (bits, group) pair of the
# default --bit-options 2,3,4,8 --group-options 32,128 that fits), and the uniform methods at
# their natural formats (4-bit and 3-bit, groups of 128).
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
field() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {'r': r}))" "$@"; }

# One row: quantize with the given flags, then evaluate against the original.
row() {
  local name=$1 target=$2; shift 2
  local stem="$out/$(echo "$name-$target" | tr -c 'A-Za-z0-9.-' '_')"
  if ! $run quantize --model "$model" --target-bits "$target" "$@" --out "$stem.h5" --report "$stem.json" >"$stem.log" 2>&1; then
    echo "| $name | $target | (no format fits: $(grep -o 'unreachable.*' "$stem.log" | head -1)) | | | | |"
    return
  fi
  $run eval --quantized "$stem.h5" --reference "$model" --data "$heldout" --seq-len 512 --report "$stem.eval.json" \
    >/dev/null 2>&1
  echo "| $name | $target | $(field "$stem.json" "'%.3f' % r['bits']['total_per_weight']") |" \
       "$(field "$stem.json" "' '.join(sorted(r['bits']['format_histogram']))") |" \
       "$(field "$stem.eval.json" "'%.4f | %.1f%% | %.2f' % (r['kl_divergence'], 100 * r['top1_agreement'], r['perplexity'])") |"
}

$run eval --model "$model" --reference "$model" --data "$heldout" --seq-len 512 --report "$out/fp32.json" >/dev/null 2>&1
echo "| method | target total bits | achieved total bits | formats | KL to FP32 | top-1 agreement | perplexity |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
echo "| FP32 | 32 | 32 | | 0 | 100% | $(field "$out/fp32.json" "'%.2f' % r['perplexity']") |"
cal="--calib $calib --seq-len 512"
for target in 4.0 3.0 2.5; do
  row "csaq (default: --objective fidelity)" $target $cal
  row "csaq --objective calibration-loss" $target $cal --objective calibration-loss
  row "csaq --salience activation" $target $cal --salience activation
  row "--method gptq" $target $cal --method gptq
  row "--method rtn" $target --method rtn
done
row "--method gptq --bit-options 4 --group-options 128" 4.2 $cal --method gptq --bit-options 4 --group-options 128
row "--method rtn --bit-options 4 --group-options 128" 4.2 --method rtn --bit-options 4 --group-options 128
row "--method gptq --bit-options 3 --group-options 128" 3.2 $cal --method gptq --bit-options 3 --group-options 128
row "--method rtn --bit-options 3 --group-options 128" 3.2 --method rtn --bit-options 3 --group-options 128
