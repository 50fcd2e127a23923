# Sourced by the launch scripts: the dry-run switch and the job -> module table.
#
# DRY_RUN=1 prints every command a script would run, one per line, shell-quoted, and runs
# none of them (nothing is created, copied, started or stopped).

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q' "$1"; shift
    [ $# -gt 0 ] && printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# The entry point of a job name (what every launcher accepts as its JOB argument).
job_module() {
  case "$1" in
    tokenizer) echo vfmtok_jax.train_tokenizer;;
    gpt) echo vfmtok_jax.train_gpt;;
    extract_codes) echo vfmtok_jax.extract_codes;;
    eval_tokenizer) echo vfmtok_jax.eval_tokenizer;;
    eval_generator) echo vfmtok_jax.eval_generator;;
    *) echo "unknown job '$1': expected tokenizer, gpt, extract_codes, eval_tokenizer or" \
         "eval_generator" >&2; return 2;;
  esac
}
