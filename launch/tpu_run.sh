#!/usr/bin/env bash
# Start the same training command on every worker of $TPU, in the background, with per-worker
# logs (~/vfmtok_logs/w<worker>.log) and a pid file that tpu_stop.sh uses.
# Usage: tpu_run.sh tokenizer CONFIG WORKDIR [--config.key=value ...]
set -euo pipefail
: "${TPU:?set TPU}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
JOB="${1:?job: tokenizer}"; CONFIG="${2:?config, e.g. configs/tokenizer.py:official}"
WORKDIR="${3:?workdir, e.g. gs://bucket/runs/x}"; shift 3
case "$JOB" in tokenizer) MODULE=vfmtok_jax.train_tokenizer;; *) echo "unknown job $JOB" >&2; exit 2;; esac
ARGS=$(printf " %q" "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --project "$PROJECT" --worker=all --command \
  "cd ~/vfmtok_jax && mkdir -p ~/vfmtok_logs && \
   W=\$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0) && \
   VFMTOK_DISTRIBUTED=1 TFDS_DATA_DIR=\${TFDS_DATA_DIR:-} nohup ~/venv/bin/python -m $MODULE \
     --config $CONFIG --workdir $WORKDIR $ARGS > ~/vfmtok_logs/w\$W.log 2>&1 & \
   echo \$! > ~/vfmtok_logs/pid"
