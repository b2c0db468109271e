#!/usr/bin/env bash
# The tables of docs/planning.md: csaq plan for Llama-3-8B and Llama-3-70B (their public
# config.json, docs/configs/) at quantize's defaults, against 80 GB and 141 GB devices.
# Usage: scripts/planning-tables.sh [extra csaq plan options, e.g. --dtype bfloat16]
set -euo pipefail
cd "$(dirname "$0")/.."
csaq=build/launcher/csaq
extra=("$@")
gib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1073741824 }'; }
echo "| model | ranks | largest rank: weights | accumulators | Hessians | activations | peak (stage) | fits 80 GB | fits 141 GB | smallest world size for 80 GB / 141 GB | checkpoint | output |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for spec in "llama-3-8b 1 2 8" "llama-3-70b 8 16 32"; do
  set -- $spec
  model=$1; shift
  for n in "$@"; do
    j80=$($csaq plan --config docs/configs/$model.json --world-size "$n" --device-memory 80GB "${extra[@]}" --json 2>/dev/null || true)
    [ -n "$j80" ] || j80=$($csaq plan --config docs/configs/$model.json --world-size "$n" --device-memory 80GB "${extra[@]}" --json)
    j141=$($csaq plan --config docs/configs/$model.json --world-size "$n" --device-memory 141GB "${extra[@]}" --json)
    top=$(jq '[.ranks[] | .peak_bytes] | index(max)' <<<"$j80")
    r=".ranks[$top].bytes"
    echo "| $model | $n | $(gib "$(jq "$r.weights" <<<"$j80")") GiB | $(gib "$(jq "$r.accumulators" <<<"$j80")") GiB |" \
         "$(gib "$(jq "$r.hessians" <<<"$j80")") GiB | $(gib "$(jq "$r.activations" <<<"$j80")") GiB |" \
         "$(gib "$(jq '.peak_bytes' <<<"$j80")") GiB ($(jq -r ".ranks[$top].peak_stage" <<<"$j80")) | $(jq '.fits' <<<"$j80") |" \
         "$(jq '.fits' <<<"$j141") | $(jq '.smallest_world_size_that_fits' <<<"$j80") / $(jq '.smallest_world_size_that_fits' <<<"$j141") |" \
         "$(gib "$(jq '.disk.calibration_checkpoint_bytes' <<<"$j80")") GiB | $(gib "$(jq '.disk.output_bytes_at_most' <<<"$j80")") GiB |"
  done
done
