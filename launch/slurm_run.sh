#!/usr/bin/env bash
# A SLURM batch job: one task per node using all its GPUs; every task runs the same job, and
# each reads its coordinator (the first node of the allocation), process count and id from
# SLURM's environment (vfmtok_jax.distributed.slurm_settings).
# Usage: sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 [--requeue] \
#          launch/slurm_run.sh JOB [FLAGS...]
# With --requeue, a preempted or requeued job resumes from its workdir's latest checkpoint;
# SLURM's SIGTERM before the kill makes the trainers checkpoint and exit cleanly.
#SBATCH --job-name=vfmtok
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
source "${VFMTOK_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}/launch/common.sh"
MODULE=$(job_module "${1:?job: tokenizer, gpt, extract_codes, eval_tokenizer, eval_generator}")
shift
: "${SLURM_JOB_ID:?run this with sbatch (or DRY_RUN=1 with SLURM_* set)}"
run srun --kill-on-bad-exit=1 --export=ALL,VFMTOK_DISTRIBUTED=1 \
  "${PYTHON:-python}" -m "$MODULE" "$@"
