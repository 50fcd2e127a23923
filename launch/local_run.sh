#!/usr/bin/env bash
# N processes on this machine forming one JAX cluster over loopback (CPU, gloo collectives):
# the multi-host code paths without a cluster. Each process gets DEVICES CPU devices.
# Usage: [DEVICES=1] [PORT=free] local_run.sh N JOB [FLAGS...]   (logs: $LOGDIR/p<i>.log)
set -euo pipefail
source "$(dirname "$0")/common.sh"
N="${1:?number of processes}"; shift
MODULE=$(job_module "${1:?job: tokenizer, gpt, extract_codes, eval_tokenizer, eval_generator}")
shift
PORT="${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
LOGDIR="${LOGDIR:-logs/local}"
run mkdir -p "$LOGDIR"
PIDS=()
for ((i = 0; i < N; i++)); do
  CMD=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES:-1}"
       VFMTOK_DISTRIBUTED=1 VFMTOK_CPU_COLLECTIVES=gloo "JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT"
       "JAX_NUM_PROCESSES=$N" "JAX_PROCESS_ID=$i" "${PYTHON:-python}" -m "$MODULE" "$@")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    run "${CMD[@]}"
  else
    "${CMD[@]}" > "$LOGDIR/p$i.log" 2>&1 &
    PIDS+=($!)
  fi
done
STATUS=0
for ((i = 0; i < ${#PIDS[@]}; i++)); do
  if ! wait "${PIDS[$i]}"; then
    echo "process $i failed; see $LOGDIR/p$i.log" >&2
    STATUS=1
  fi
done
exit $STATUS
