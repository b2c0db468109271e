#!/usr/bin/env bash
# Reproduces the README's quality table: tinystories-656k calibrated on tinystories-calib.npy,
# perplexity on tinystories-heldout.npy (seq-len 512), FP32 against uniform round-to-nearest,
# uniform GPTQ, the activation-proxy (AWQ-style) allocation and csaq, at 4.2, 4.0, 3.0 and 2.5
# total bits per weight, every method with the default --bit-options 2,3,4,8 and
# --group-options 32,128 (the uniform methods take the widest pair that fits).
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
field() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {'r': r}))" "$@"; }

echo "| method | target total bits | achieved total bits | formats | perplexity |"
echo "| --- | --- | --- | --- | --- |"
echo "| FP32 | 32 | 32 | | $(ppl --model "$model") |"
for target in 4.2 4.0 3.0 2.5; do
  for variant in rtn gptq activation csaq; do
    case $variant in
      rtn) flags="--method rtn" ;;
      gptq) flags="--method gptq --calib $calib --seq-len 512" ;;
      activation) flags="--salience activation --calib $calib --seq-len 512" ;;
      csaq) flags="--calib $calib --seq-len 512 --keep-all-statistics" ;;  # (for agreement_top5; same result)
    esac
    if ! $run quantize --model "$model" --target-bits $target $flags \
        --out "$out/$variant-$target.h5" --report "$out/$variant-$target.json" >"$out/log" 2>&1; then
      echo "| $variant | $target | (no format fits: $(grep -o 'unreachable.*' "$out/log" | head -1)) | | |"
      continue
    fi
    formats=$(field "$out/$variant-$target.json" "' '.join(sorted(r['bits']['format_histogram']))")
    echo "| $variant | $target | $(field "$out/$variant-$target.json" "'%.3f' % r['bits']['total_per_weight']") | $formats | $(ppl --quantized "$out/$variant-$target.h5") |"
  done
done
field "$out/csaq-4.0.json" "'agreement_top5 (causal vs activation, csaq at 4.0): %.3f' % r['agreement_top5']"
