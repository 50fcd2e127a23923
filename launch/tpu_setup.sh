#!/usr/bin/env bash
# Copy this repository to every worker of $TPU and install it with the TPU extra.
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${TPU:?set TPU}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/vfmtok_jax.tgz"
run tar -C "$ROOT" --exclude=.git --exclude=runs -czf "$TARBALL" .
run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU":/tmp/vfmtok_jax.tgz --zone "$ZONE" \
  --project "$PROJECT" --worker=all
run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --project "$PROJECT" --worker=all \
  --command "mkdir -p ~/vfmtok_jax && tar -C ~/vfmtok_jax -xzf /tmp/vfmtok_jax.tgz && \
cd ~/vfmtok_jax && python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip && \
~/venv/bin/pip install -q -e '.[tpu]'"
