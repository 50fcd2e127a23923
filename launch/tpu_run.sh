#!/usr/bin/env bash
# Start the same job on every worker of $TPU, in the background, with per-worker logs
# (~/vfmtok_logs/w<worker>.log) and a pid file that tpu_stop.sh uses.
# Usage: tpu_run.sh JOB [FLAGS...]   JOB: tokenizer | gpt | extract_codes | eval_tokenizer |
#        eval_generator; FLAGS go to the job (e.g. --config configs/gpt.py:gpt_xl --workdir gs://b/r)
# Re-running the same command after a preemption resumes from the workdir's latest checkpoint.
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${TPU:?set TPU}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
MODULE=$(job_module "${1:?job: tokenizer, gpt, extract_codes, eval_tokenizer, eval_generator}")
shift
ARGS=$(printf " %q" "$@")
run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --project "$PROJECT" --worker=all \
  --command "cd ~/vfmtok_jax && mkdir -p ~/vfmtok_logs && \
W=\$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0) && \
VFMTOK_DISTRIBUTED=1 TFDS_DATA_DIR=\${TFDS_DATA_DIR:-} nohup ~/venv/bin/python -m $MODULE$ARGS \
> ~/vfmtok_logs/w\$W.log 2>&1 & echo \$! > ~/vfmtok_logs/pid"
