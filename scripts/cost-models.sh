#!/usr/bin/env bash
# Reproduces docs/method-choices.md's comparison of the cost models on tinystories-656k. Two
# salience files, one per objective (fidelity: labels drawn from the model; calibration-loss:
# the text's labels, with the post-quantization integral), each with every per-weight
# statistic; for every cost model the plan at 4.0, 3.0 and 2.5 total bits and its KL to FP32,
# top-1 agreement and perplexity on held-out text; and csaq check-costs (rank correlation of
# each model's prediction with the true change of the KL and of the loss when single rows or
# whole Linears are quantized) on calibration and held-out text. About 40 minutes on 2 cores.
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

$csaq profile --model "$model" --calib "$calib" --seq-len 512 --keep-all-statistics --out "$out/fidelity.h5" \
  >/dev/null 2>&1
$csaq profile --model "$model" --calib "$calib" --seq-len 512 --objective calibration-loss --salience pqi \
  --keep-all-statistics --out "$out/calibration-loss.h5" >/dev/null 2>&1
echo "| objective of the salience file | cost model | 4.0 bits: KL, top-1, perplexity | 3.0 bits | 2.5 bits |"
echo "| --- | --- | --- | --- | --- |"
for objective in fidelity calibration-loss; do
  kinds="hessian fisher causal activation magnitude"
  [ $objective = calibration-loss ] && kinds="taylor hessian pqi fisher causal"
  for kind in $kinds; do
    row="| $objective | $kind |"
    for target in 4.0 3.0 2.5; do
      $csaq solve --model "$model" --profile "$out/$objective.h5" --salience $kind --target-bits $target \
        --out "$out/p.h5" --overwrite >/dev/null 2>&1
      $csaq pack --model "$model" --plan "$out/p.h5" --profile "$out/$objective.h5" --out "$out/q.h5" \
        --report "$out/q.json" --overwrite >/dev/null 2>&1
      $csaq eval --quantized "$out/q.h5" --reference "$model" --data "$heldout" --seq-len 512 \
        --report "$out/e.json" --overwrite >/dev/null 2>&1
      row="$row $(python3 -c "import json,sys; q=json.load(open(sys.argv[1])); e=json.load(open(sys.argv[2]))
print('%.4f, %.1f%%, %.2f (%.3f)' % (e['kl_divergence'], 100 * e['top1_agreement'], e['perplexity'], q['bits']['total_per_weight']))" \
        "$out/q.json" "$out/e.json") |"
    done
    echo "$row"
  done
done
for objective in fidelity calibration-loss; do
  for data in calib heldout; do
    limit=""
    [ $data = calib ] && limit="--max-sequences 16"
    file=$shared/data/tinystories-$data.npy
    echo "== salience file of --objective $objective, $data"
    $csaq check-costs --model "$model" --profile "$out/$objective.h5" --data "$file" --seq-len 512 $limit \
      --samples 120 2>/dev/null
    $csaq check-costs --model "$model" --profile "$out/$objective.h5" --data "$file" --seq-len 512 $limit \
      --unit linear --samples 56 2>/dev/null
  done
done
