#!/usr/bin/env bash
# One process per node using all its GPUs. Set COORDINATOR (host:port of node 0), NUM_NODES,
# NODE_RANK. Usage: gpu_run.sh CONFIG WORKDIR [--config.key=value ...]
set -euo pipefail
CONFIG="${1:?config}"; WORKDIR="${2:?workdir}"; shift 2
if [ "${NUM_NODES:-1}" -gt 1 ]; then
  export VFMTOK_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS="${COORDINATOR:?set COORDINATOR}"
  export JAX_NUM_PROCESSES="$NUM_NODES" JAX_PROCESS_ID="${NODE_RANK:?set NODE_RANK}"
fi
mkdir -p logs
exec python -m vfmtok_jax.train_tokenizer --config "$CONFIG" --workdir "$WORKDIR" "$@" \
  2>&1 | tee "logs/node${NODE_RANK:-0}.log"
