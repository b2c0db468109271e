#!/bin/bash
# Runs one csaq command as a SLURM job step and makes it survive preemption:
#   - SIGUSR1/SIGTERM sent to the batch script (sbatch --signal=B:USR1@300, or scancel
#     --batch --signal=USR1) are forwarded to the step's tasks, which agree at the next round,
#     commit a calibration checkpoint and exit with status 75;
#   - on 75 the job is requeued (sbatch --requeue), and the requeued run resumes from the
#     checkpoint (--resume auto, the default).
# Usage (from a batch script): exec slurm/csaq-step.sh quantize --model ... --out ...
# CSAQ: the csaq executable (default: build/launcher/csaq under $SLURM_SUBMIT_DIR).
set -u
CSAQ=${CSAQ:-${SLURM_SUBMIT_DIR:-$PWD}/build/launcher/csaq}

# One task per GPU (csaq picks the GPU by node-local rank); PMIx so the tasks form one MPI
# world (csaq checks that against SLURM_NTASKS).
srun --mpi="${CSAQ_SRUN_MPI:-pmix}" --kill-on-bad-exit=1 "$CSAQ" "$@" &
step=$!

forward() {
  echo "csaq job ${SLURM_JOB_ID:-?}: got SIG$1, forwarding it to the tasks"
  scancel --signal="$1" "${SLURM_JOB_ID}.${SLURM_STEP_ID:-0}" 2>/dev/null || kill -s "$1" "$step"
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

status=0
while :; do
  wait "$step"
  status=$?
  kill -0 "$step" 2>/dev/null || break  # wait returned for a trapped signal: keep waiting
done

if [ "$status" -eq 75 ]; then
  echo "csaq job ${SLURM_JOB_ID:-?}: calibration checkpoint committed, requeueing"
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit "$status"
