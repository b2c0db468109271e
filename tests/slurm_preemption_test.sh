#!/bin/bash
# A real SLURM job survives preemption: on a one-node cluster on loopback
# (slurm/local-cluster.sh), sbatch runs csaq quantize with 2 tasks under srun
# (slurm/csaq-step.sh); once a calibration checkpoint is committed, scancel --signal=USR1
# preempts it; the job exits 75, requeues itself, resumes and finishes. Its checkpoint must
# equal an uninterrupted srun run's, dataset for dataset, and its report too (timings aside).
# Usage: slurm_preemption_test.sh CSAQ REPO. Needs root and Debian's slurmctld, slurmd,
# slurm-client, munge, hdf5-tools and jq; exits 77 (skipped) without them.
set -euo pipefail
csaq=$1
repo=$2
for tool in slurmctld slurmd sbatch munged h5diff jq; do
  command -v "$tool" > /dev/null || { echo "SKIP: $tool not installed (scripts/install-deps.sh installs it)"; exit 77; }
done
[ "$(id -u)" -eq 0 ] || { echo "SKIP: the local SLURM cluster runs its daemons as root"; exit 77; }

work=$(mktemp -d /tmp/csaq-slurm-test.XXXXXX)
cleanup() { "$repo/slurm/local-cluster.sh" stop "$work/slurm" > /dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
eval "$("$repo/slurm/local-cluster.sh" start "$work/slurm")"
cd "$work"
"$csaq" make-demo --out demo --layers 3 --hidden 64 --intermediate 160 --heads 4 --kv-heads 2 --vocab 260 \
  --tokens 4096 > /dev/null
args="quantize --model $work/demo --calib $work/demo/calib.txt --samples 24 --seq-len 64 --in-flight 2
      --checkpoint-every 2 --early-stop-rho 2 --target-bits 5 --bit-options 2,4,8 --group-options 32"

# The reference: the same job, uninterrupted.
timeout 120 srun --mpi=pmix -n 2 "$csaq" $args --out "$work/ref.h5" --report "$work/ref.json" > ref.log 2>&1

cat > job.sbatch <<JOB
#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=$work/job.log
export CSAQ=$csaq CSAQ_TEST_ROUND_DELAY_MS=500
exec $repo/slurm/csaq-step.sh $(echo $args) --out $work/out.h5 --report $work/out.json
JOB
job=$(sbatch --parsable --chdir="$work" job.sbatch)
echo "submitted job $job"
for _ in $(seq 600); do
  ls "$work"/out.h5.calib/*.done > /dev/null 2>&1 && break
  sleep 0.1
done
ls "$work"/out.h5.calib/*.done > /dev/null 2>&1 || { cat job.log; echo "FAIL: no checkpoint committed"; exit 1; }
scancel --signal=USR1 "$job"
echo "sent USR1 to job $job"
pending_since=
for _ in $(seq 4000); do
  [ -z "$(squeue -h -j "$job" 2>/dev/null)" ] && [ -f "$work/out.h5" ] && break
  # SLURM holds a requeued job back for about two minutes; once the old allocation has had
  # 10 s to clean up, start it, as an impatient user would.
  if grep -q requeueing job.log && [ "$(squeue -h -j "$job" -o %t 2>/dev/null)" = PD ]; then
    pending_since=${pending_since:-$SECONDS}
    if [ $((SECONDS - pending_since)) -ge 10 ]; then
      scontrol update JobId="$job" StartTime=now 2>/dev/null || true
    fi
  fi
  sleep 0.1
done
cat job.log
grep -q "preempted: calibration checkpoint" job.log || { echo "FAIL: the job was not preempted"; exit 1; }
grep -q "requeueing" job.log || { echo "FAIL: the job did not requeue itself"; exit 1; }
grep -q "\[resume\]" job.log || { echo "FAIL: the requeued job did not resume"; exit 1; }
[ -f "$work/out.h5" ] || { echo "FAIL: the requeued job did not finish"; exit 1; }
h5diff --exclude-path /report.json --exclude-path /checksums.json "$work/ref.h5" "$work/out.h5" || { echo "FAIL: checkpoints differ"; exit 1; }
diff <(jq -S 'del(.time_s, .memory, .runtime)' "$work/ref.json") <(jq -S 'del(.time_s, .memory, .runtime)' "$work/out.json") ||
  { echo "FAIL: reports differ"; exit 1; }
echo "PASS: preempted, requeued, resumed; checkpoint and report equal the uninterrupted run's"
