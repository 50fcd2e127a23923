"""Pre-extracted codes: the record format, extraction (resumable), and the AR train order."""

import json
import os

import numpy as np
import pytest

from configs import extract_codes as extract_configs
from vfmtok_jax import tokenizer_io
from vfmtok_jax.data import codes as codes_lib
from vfmtok_jax.data import input_pipeline
from vfmtok_jax.tasks import code_extraction
from tests.test_sample_cli import run_processes


def _write_folder(folder, labels, codes, shard_sizes):
  os.makedirs(folder, exist_ok=True)
  shards, start = [], 0
  for i, n in enumerate(shard_sizes):
    name = codes_lib.shard_name(i, len(shard_sizes))
    w = codes_lib.ShardWriter(str(folder), name)
    for j in range(start, start + n):
      w.write(int(labels[j]), codes[j])
    w.close()
    shards.append((name + ".arrayrecord", n))
    start += n
  codes_lib.write_info(str(folder), codes_lib.CodesInfo(
      num_tokens=codes.shape[2], num_variants=codes.shape[1], variants="flip",
      codebook_size=1024, num_classes=int(labels.max()) + 1,
      tokenizer={"path": "t", "fingerprint": "f"}, source={}, shards=tuple(shards)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 37)
  codes = rng.integers(0, 1024, (37, 2, 16))
  path = tmp_path_factory.mktemp("codes")
  _write_folder(path, labels, codes, [10, 0, 27])
  return str(path), labels, codes


def test_records_round_trip(folder):
  path, labels, codes = folder
  ds = codes_lib.CodesDataset(path)
  assert len(ds) == 37
  got_labels, got_codes = ds.read([36, 0, 9, 10, 20])
  np.testing.assert_array_equal(got_labels, labels[[36, 0, 9, 10, 20]])
  np.testing.assert_array_equal(got_codes, codes[[36, 0, 9, 10, 20]])
  with pytest.raises(codes_lib.CodesError, match="bytes"):
    codes_lib.decode_records([b"\0" * 7], 2, 16)
  with pytest.raises(ValueError, match="outside"):
    codes_lib.encode_record(0, np.array([[70000]]))


def _global_batches(ds, steps, pc, start=0, **kw):
  """The global batches as `pc` processes would assemble them."""
  its = [codes_lib.CodesIterator(ds, global_batch=8, seed=3, start_step=start, process_index=p,
                                 process_count=pc, **kw) for p in range(pc)]
  out = []
  for _ in range(steps):
    parts = [next(it) for it in its]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return out


def test_order_is_independent_of_process_count_and_resumes(folder):
  path, labels, codes = folder
  ds = codes_lib.CodesDataset(path)
  one = _global_batches(ds, 12, 1)
  for pc in (2, 4):
    for a, b in zip(one, _global_batches(ds, 12, pc)):
      np.testing.assert_array_equal(a["codes"], b["codes"])
      np.testing.assert_array_equal(a["label"], b["label"])
  resumed = _global_batches(ds, 5, 2, start=7)
  for a, b in zip(one[7:], resumed):
    np.testing.assert_array_equal(a["codes"], b["codes"])
  # Each epoch visits every example once; both variants are drawn.
  it = codes_lib.CodesIterator(ds, global_batch=8, seed=3, process_index=0, process_count=1)
  seen = np.concatenate([it.global_indices(s)[0] for s in range(37)])  # 8 epochs exactly
  for e in range(8):
    assert sorted(seen[e * 37:(e + 1) * 37]) == list(range(37))
  variants = np.concatenate([it.global_indices(s)[1] for s in range(37)])
  assert 0.3 < variants.mean() < 0.7
  # The codes are those of the chosen example and variant.
  ex, var = it.global_indices(2)
  np.testing.assert_array_equal(one[2]["codes"], codes[ex, var])
  np.testing.assert_array_equal(one[2]["label"], labels[ex])
  first = _global_batches(ds, 3, 1, variants="first")
  assert all((codes[it.global_indices(s)[0], 0] == first[s]["codes"]).all() for s in range(3))


class _Counting:
  def __init__(self, source):
    self._source, self.reads = source, 0

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    self.reads += 1
    return self._source[i]


@pytest.mark.parametrize("start", [10, 100_000])
def test_resuming_reads_only_the_batch(folder, start):
  """Resuming at step 100,000 reads what resuming at step 10 reads: this process's rows of the
  batch, nothing before them (synchronous reads: nothing read ahead either)."""
  path, labels, codes = folder
  ds = codes_lib.CodesDataset(path)
  ds.source = _Counting(ds.source)
  it = codes_lib.CodesIterator(ds, global_batch=8, seed=3, start_step=start, process_index=1,
                               process_count=2, num_threads=0, prefetch=0)
  batch = next(it)
  assert ds.source.reads == 4 and it.step == start + 1
  ex, var = it.global_indices(start)
  np.testing.assert_array_equal(batch["codes"], codes[ex[4:], var[4:]])
  np.testing.assert_array_equal(batch["label"], labels[ex[4:]])


def test_held_out_split(folder):
  path, _, _ = folder
  ds = codes_lib.CodesDataset(path)
  train, held = codes_lib.split_held_out(len(ds), 5, seed=0)
  assert len(held) == 5 and not set(train) & set(held) and len(train) + 5 == 37
  it = codes_lib.CodesIterator(ds, global_batch=8, seed=0, examples=train, process_index=0,
                               process_count=1)
  seen = np.concatenate([it.global_indices(s)[0] for s in range(10)])
  assert not set(seen) & set(held)
  with pytest.raises(codes_lib.CodesError, match="held_out"):
    codes_lib.split_held_out(37, 37, seed=0)


def test_missing_or_incomplete_folder_is_named(tmp_path, folder):
  with pytest.raises(codes_lib.CodesError, match="extract_codes"):
    codes_lib.CodesDataset(str(tmp_path))
  path, labels, codes = folder
  info = json.load(open(os.path.join(path, "codes.json")))
  info["shards"][0][1] = 11
  bad = tmp_path / "bad"
  bad.mkdir()
  for f in os.listdir(path):
    if f.endswith(".arrayrecord"):
      os.symlink(os.path.join(path, f), bad / f)
  json.dump(info, open(bad / "codes.json", "w"))
  with pytest.raises(codes_lib.CodesError, match="holds 10 records"):
    codes_lib.CodesDataset(str(bad))


# ----------------------------------------------------------------------------------------------
# Extraction with the golden tokenizer on the demo photos.
# ----------------------------------------------------------------------------------------------

def _extract_config(**kw):
  c = extract_configs.get_config("demo,crops_per_photo=2")
  c.num_shards = 3
  c.batch_size = 4
  for k, v in kw.items():
    c[k] = v
  return c


def test_extraction_writes_the_tokenizers_codes_and_resumes(golden_tokenizer, tmp_path, capsys):
  tok_path, tok = golden_tokenizer
  out = str(tmp_path / "codes")
  info = code_extraction.extract(tok, _extract_config(), out, tok_path=tok_path)
  assert info.num_examples == 24 and info.num_variants == 2 and info.num_classes == 12
  assert info.tokenizer["fingerprint"] == tokenizer_io.fingerprint(tok)
  ds = codes_lib.CodesDataset(out)
  labels, codes = ds.read(range(24))
  crops, want_labels = input_pipeline.demo_eval_set(32, 2, 0, 0.8, 1.0)
  np.testing.assert_array_equal(labels, want_labels)
  images = crops.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_array_equal(codes[:, 0], tok.encode(images))
  np.testing.assert_array_equal(codes[:, 1], tok.encode(images[:, :, ::-1]))
  # A kill during shard 1: its marker is gone. A re-run keeps 0 and 2 and redoes 1.
  os.remove(os.path.join(out, "shard-00001-of-00003.json"))
  before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
  capsys.readouterr()
  code_extraction.extract(tok, _extract_config(), out, tok_path=tok_path)
  text = capsys.readouterr().out
  assert text.count("finished earlier, kept") == 2 and "shard-00001-of-00003: 8 examples" in text
  assert os.path.getmtime(os.path.join(out, "shard-00000-of-00003.arrayrecord")) == \
      before["shard-00000-of-00003.arrayrecord"]
  np.testing.assert_array_equal(codes_lib.CodesDataset(out).read(range(24))[1], codes)
  with pytest.raises(codes_lib.CodesError, match="other settings.*variants"):
    code_extraction.extract(tok, _extract_config(variants="none"), out, tok_path=tok_path)


def test_ten_crop_variants_follow_torchvision():
  x = np.arange(2 * 11 * 12 * 3, dtype=np.float32).reshape(2, 11, 12, 3)
  v = code_extraction.variant_images(x, "ten_crop", 8)
  assert v.shape == (2, 10, 8, 8, 3)
  np.testing.assert_array_equal(v[:, 0], x[:, :8, :8])          # top-left
  np.testing.assert_array_equal(v[:, 3], x[:, 3:, 4:])          # bottom-right
  np.testing.assert_array_equal(v[:, 4], x[:, 2:10, 2:10])      # centre: round(1.5), round(2)
  np.testing.assert_array_equal(v[:, 5], x[:, :8, ::-1][:, :, :8])  # flipped image's top-left
  f = code_extraction.variant_images(x[:, :8, :8], "flip", 8)
  np.testing.assert_array_equal(f[:, 1], x[:, :8, :8][:, :, ::-1])


def test_two_processes_extract_what_one_extracts(golden_tokenizer, tmp_path):
  """`extract_codes` as 2 processes (one device each, 3 shards dealt between them) writes the
  records and codes.json one process writes (here in-process on 8 devices)."""
  tok_path, tok = golden_tokenizer
  one = str(tmp_path / "one")
  code_extraction.extract(tok, _extract_config(), one, tok_path=tok_path)
  two = str(tmp_path / "two")
  run_processes(["-m", "vfmtok_jax.extract_codes", "--tokenizer", tok_path, "--config",
                 "configs/extract_codes.py:demo,crops_per_photo=2", "--config.num_shards=3",
                 "--config.batch_size=4", "--out", two], devices_each=1, tmp_path=tmp_path)
  assert json.load(open(os.path.join(two, "codes.json"))) == \
      json.load(open(os.path.join(one, "codes.json")))
  for a, b in zip(codes_lib.CodesDataset(one).read(range(24)),
                  codes_lib.CodesDataset(two).read(range(24))):
    np.testing.assert_array_equal(a, b)
