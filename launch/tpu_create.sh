#!/usr/bin/env bash
# Create a Cloud TPU VM slice. Usage: TPU=name ZONE=zone PROJECT=project tpu_create.sh ACCELERATOR [--spot]
set -euo pipefail
: "${TPU:?set TPU}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
ACCEL="${1:?accelerator type, e.g. v5litepod-32 or v4-32}"; shift
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
case "$ACCEL" in v5litepod*) VERSION="${TPU_VERSION:-v2-alpha-tpuv5-lite}";; esac
gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --project "$PROJECT" \
  --accelerator-type "$ACCEL" --version "$VERSION" "$@"
