#!/usr/bin/env bash
# Send SIGTERM to the processes tpu_run.sh started (they checkpoint and exit cleanly).
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${TPU:?set TPU}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --project "$PROJECT" --worker=all \
  --command "test -f ~/vfmtok_logs/pid && kill -TERM \$(cat ~/vfmtok_logs/pid) || true"
