#!/usr/bin/env bash
# Create a Cloud TPU VM slice.
# Usage: TPU=name ZONE=zone PROJECT=project tpu_create.sh ACCELERATOR [gcloud flags, e.g. --spot]
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${TPU:?set TPU}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
ACCEL="${1:?accelerator type, e.g. v5litepod-32, v5p-128 or v4-32}"; shift
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
case "$ACCEL" in
  v5litepod*) VERSION="${TPU_VERSION:-v2-alpha-tpuv5-lite}";;
  v5p*) VERSION="${TPU_VERSION:-v2-alpha-tpuv5}";;
  v6e*) VERSION="${TPU_VERSION:-v2-alpha-tpuv6e}";;
esac
run gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --project "$PROJECT" \
  --accelerator-type "$ACCEL" --version "$VERSION" "$@"
