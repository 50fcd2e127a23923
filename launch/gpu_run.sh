#!/usr/bin/env bash
# One process per node using all its GPUs; run it on every node.
# Multi-node: set COORDINATOR (host:port of node 0), NUM_NODES and NODE_RANK.
# Usage: gpu_run.sh JOB [FLAGS...]   (JOB as in tpu_run.sh; logs/node<rank>.log)
set -euo pipefail
source "$(dirname "$0")/common.sh"
MODULE=$(job_module "${1:?job: tokenizer, gpt, extract_codes, eval_tokenizer, eval_generator}")
shift
ENV=()
if [ "${NUM_NODES:-1}" -gt 1 ]; then
  ENV=(VFMTOK_DISTRIBUTED=1 "JAX_COORDINATOR_ADDRESS=${COORDINATOR:?set COORDINATOR}"
       "JAX_NUM_PROCESSES=$NUM_NODES" "JAX_PROCESS_ID=${NODE_RANK:?set NODE_RANK}")
fi
LOG="logs/node${NODE_RANK:-0}.log"
run mkdir -p logs
if [ "${DRY_RUN:-0}" = 1 ]; then
  run env "${ENV[@]}" python -m "$MODULE" "$@"
  echo "(output to $LOG)"
else
  env "${ENV[@]}" python -m "$MODULE" "$@" 2>&1 | tee "$LOG"
fi
