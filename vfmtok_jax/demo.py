r"""The whole VFMTok pipeline on the offline demo photos, on CPU.

  python -m vfmtok_jax.demo --workdir runs/demo

Stages (each reused when its output already exists in --workdir, so a re-run resumes):
  1. tokenizer   configs/tokenizer.py:demo             -> WORKDIR/tokenizer (export/ at the end)
  2. codes       configs/extract_codes.py:demo         -> WORKDIR/codes (crops of each photo
                 and their flips, through the tokenizer)
  3. GPT         configs/gpt.py:demo (photos = classes) -> WORKDIR/gpt (gpt/ at the end)
  4. samples     per class, CFG-free and CFG 2.0       -> WORKDIR/samples.png, samples.npz
Prints the held-out next-token loss at the GPT's start and end against the uniform log V.
`--runlocal`: the same four stages on each config's `runlocal` variant (a few steps, 2 crops
per photo): a smoke run of the pipeline, not a model.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF (tfds, TensorBoard) quiet at import

# pylint: disable=wrong-import-position

from absl import flags
import jax
import numpy as np

from configs import extract_codes as extract_configs
from configs import gpt as gpt_configs
from configs import tokenizer as tokenizer_configs
from vfmtok_jax import cli_setup
from vfmtok_jax import gpt_io
from vfmtok_jax import tokenizer_io
from vfmtok_jax.data import codes as codes_lib
from vfmtok_jax.data import images as image_io
from vfmtok_jax.data import input_pipeline
from vfmtok_jax.tasks import code_extraction
from vfmtok_jax.tasks import gpt as gpt_task
from vfmtok_jax.tasks import sampler
from vfmtok_jax.tasks import tokenizer as tokenizer_task

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "where every stage writes")
_SAMPLES = flags.DEFINE_integer("samples_per_class", 4, "samples per class in each grid half")
_CFG = flags.DEFINE_float("cfg", 2.0, "guidance scale of the guided half")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False, "smoke run: every stage's runlocal config")
_CACHE = cli_setup.define_cache_flag()


def _stage(name: str):
  print(f"\n=== {name} ===", flush=True)
  return time.perf_counter()


def sample_sheet(model, params, tok, *, per_class: int, cfg: float, seed: int = 0):
  """uint8 sheet: one row per class, [real centre crop | CFG-free samples | guided samples]."""
  labels = np.repeat(np.arange(model.num_classes, dtype=np.int32), per_class)
  halves, tokens = [], {}
  for scale in (1.0, cfg):
    toks, _ = sampler.generate(model, params, labels, jax.random.PRNGKey(seed),
                               sampler.SamplingSettings(cfg_scale=scale))
    toks = np.asarray(toks)
    tokens[scale] = toks
    halves.append(image_io.to_uint8(np.asarray(tok.decode_indices(toks))))
  size = tok.model.image_size
  crops, crop_labels = input_pipeline.demo_eval_set(size, 1, 0, 0.8, 1.0)
  rows = []
  for c in range(model.num_classes):
    real = crops[crop_labels == c][:1]
    rows.append(np.concatenate([real, halves[0][labels == c], halves[1][labels == c]]))
  return image_io.image_grid(rows), labels, tokens


def run(workdir: str, *, per_class: int = 4, cfg: float = 2.0, runlocal: bool = False) -> dict:
  """Runs (or resumes) the four stages; returns the numbers the README reports. `runlocal`:
  each stage's smoke config (tokenizer and GPT `demo,runlocal`, 2 crops per photo)."""
  variant = "demo,runlocal" if runlocal else "demo"
  report = {}
  start = time.perf_counter()
  tok_dir = os.path.join(workdir, "tokenizer")
  tok_export = os.path.join(tok_dir, "export")
  t = _stage("1/4 tokenizer (configs/tokenizer.py:demo)")
  if os.path.isfile(os.path.join(tok_export, tokenizer_io.TOKENIZER_JSON)):
    print(f"reusing the tokenizer in {tok_export}")
  else:
    final = tokenizer_task.train(tokenizer_configs.get_config(variant), tok_dir)
    report.update({k: final[k] for k in ("eval_psnr", "eval_psnr_start",
                                         "eval_codebook_usage", "eval_codebook_perplexity")
                   if k in final})
  report["tokenizer_s"] = time.perf_counter() - t

  t = _stage("2/4 codes (configs/extract_codes.py:demo)")
  codes_dir = os.path.join(workdir, "codes")
  tok = tokenizer_io.load_tokenizer(tok_export)
  if os.path.isfile(os.path.join(codes_dir, codes_lib.CODES_JSON)):
    info = codes_lib.read_info(codes_dir)
    print(f"reusing the codes in {codes_dir}")
  else:
    extract_cfg = extract_configs.get_config("demo,crops_per_photo=2" if runlocal else "demo")
    info = code_extraction.extract(tok, extract_cfg, codes_dir, tok_path=tok_export)
  print(f"{info.num_examples} crops x {info.num_variants} variants x {info.num_tokens} codes")
  report["codes_s"] = time.perf_counter() - t

  t = _stage("3/4 GPT (configs/gpt.py:demo)")
  gpt_cfg = gpt_configs.get_config(variant)
  gpt_cfg.data.codes = codes_dir
  gpt_cfg.tokenizer = tok_export
  if runlocal:
    gpt_cfg.data.held_out = 8  # of the 24 runlocal crops
  gpt_dir = os.path.join(workdir, "gpt")
  gpt_export = os.path.join(gpt_dir, "gpt")
  if os.path.isfile(os.path.join(gpt_export, gpt_io.GPT_JSON)):
    print(f"reusing the GPT in {gpt_export}")
  else:
    final = gpt_task.train(gpt_cfg, gpt_dir)
    report.update({k: final[k] for k in ("eval_loss", "eval_loss_start", "eval_accuracy",
                                         "eval_uniform_loss") if k in final})
  report["gpt_s"] = time.perf_counter() - t

  t = _stage("4/4 samples")
  model, params, _ = gpt_io.load_gpt(gpt_export)
  sheet, labels, tokens = sample_sheet(model, params, tok, per_class=per_class, cfg=cfg)
  image_io.save_png(os.path.join(workdir, "samples.png"), sheet)
  np.savez(os.path.join(workdir, "samples.npz"), labels=labels,
           indices_cfg_free=tokens[1.0], indices_cfg=tokens[cfg])
  report["samples_s"] = time.perf_counter() - t
  report["total_s"] = time.perf_counter() - start
  print(f"wrote {os.path.join(workdir, 'samples.png')} (rows: classes; columns: a real crop, "
        f"{per_class} CFG-free samples, {per_class} samples at CFG {cfg})")
  if "eval_loss" in report:
    print(f"GPT held-out next-token loss: {report['eval_loss_start']:.3f} at step 0 -> "
          f"{report['eval_loss']:.3f} at the end (uniform log V = "
          f"{report['eval_uniform_loss']:.3f})")
  print(f"total {report['total_s'] / 60:.1f} min")
  path = os.path.join(workdir, "demo_report.json")
  if os.path.isfile(path):  # a re-run keeps the numbers of the stages it reused
    with open(path) as f:
      report = {**json.load(f), **report}
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  return report


def main(argv):
  cli_setup.start(argv, _CACHE, multi_host=False)
  run(_WORKDIR.value, per_class=_SAMPLES.value, cfg=_CFG.value, runlocal=_RUNLOCAL.value)


if __name__ == "__main__":
  cli_setup.run(main)
