#!/usr/bin/env bash
# Tail the logs of worker ${WORKER:-0} (WORKER=all for every worker).
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${TPU:?set TPU}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --project "$PROJECT" \
  --worker="${WORKER:-0}" --command "tail -n ${LINES:-50} ~/vfmtok_logs/w*.log"
