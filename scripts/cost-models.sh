#!/usr/bin/env bash
# Reproduces docs/method-choices.md's comparison of the cost models on tinystories-656k: one
# salience file (with the post-quantization integral), then for every cost model the plan at
# 4.0, 3.0 and 2.5 total bits and its held-out perplexity, and csaq check-costs (rank
# correlation of each model's prediction with the true loss change of quantizing single rows
# and whole Linears) on calibration and held-out text. About half an hour on 2 cores.
# Usage: scripts/cost-models.sh [SHARED_DIR]   (after building into build/)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
csaq="./build/launcher/csaq"
model=$shared/models/tinystories-656k
calib=$shared/data/tinystories-calib.npy
heldout=$shared/data/tinystories-heldout.npy
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

$csaq profile --model "$model" --calib "$calib" --seq-len 512 --salience pqi --keep-all-statistics --out "$out/s.h5" 2>/dev/null >/dev/null
echo "| cost model | 4.0 bits | 3.0 bits | 2.5 bits |"
echo "| --- | --- | --- | --- |"
for kind in taylor hessian pqi causal fisher activation magnitude; do
  row="| $kind |"
  for target in 4.0 3.0 2.5; do
    $csaq solve --model "$model" --profile "$out/s.h5" --salience $kind --target-bits $target --out "$out/p.h5" \
      --overwrite >/dev/null 2>&1
    $csaq pack --model "$model" --plan "$out/p.h5" --profile "$out/s.h5" --out "$out/q.h5" --report "$out/q.json" \
      --overwrite >/dev/null 2>&1
    ppl=$($csaq eval --quantized "$out/q.h5" --data "$heldout" --seq-len 512 2>/dev/null | sed -n 's/^perplexity: //p')
    bits=$(python3 -c "import json,sys; print('%.3f' % json.load(open(sys.argv[1]))['bits']['total_per_weight'])" "$out/q.json")
    row="$row $ppl ($bits) |"
  done
  echo "$row"
done
for data in calib heldout; do
  limit=""
  [ $data = calib ] && limit="--max-sequences 16"
  file=$shared/data/tinystories-$data.npy
  $csaq check-costs --model "$model" --profile "$out/s.h5" --data "$file" --seq-len 512 $limit --samples 120 2>/dev/null
  $csaq check-costs --model "$model" --profile "$out/s.h5" --data "$file" --seq-len 512 $limit --unit linear \
    --samples 56 2>/dev/null
done
