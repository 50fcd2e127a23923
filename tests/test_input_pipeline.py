"""Input pipeline: ADM transforms, sources, per-process shards, restore, global arrays, errors."""

import os

import jax
import numpy as np
from PIL import Image
import pytest

from vfmtok_jax.data import input_pipeline as ip
from vfmtok_jax.data import transforms

S = 32  # small output side keeps the tests fast


# ----------------------------------------------------------------------------------------------
# Transforms.
# ----------------------------------------------------------------------------------------------

class _FakeRng:
  """Records `integers` calls and answers from a script (duck-types np.random.Generator)."""

  def __init__(self, answers, uniform=0.9):
    self.calls, self._answers, self._uniform = [], list(answers), uniform

  def integers(self, *args):
    self.calls.append(args)
    return self._answers.pop(0)

  def random(self):
    return self._uniform


def test_crop_size_range_is_adm_rule():
  assert transforms.crop_size_range(336) == (336, 420)
  assert transforms.crop_size_range(256, 0.8, 1.0) == (256, 320)
  assert transforms.crop_size_range(100, 0.5, 0.9) == (112, 200)
  with pytest.raises(ValueError):
    transforms.crop_size_range(32, 0.9, 0.8)


def test_random_crop_arr_follows_adm():
  rgb = np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8)
  rng = _FakeRng([350, 5, 7])
  out = transforms.random_crop_arr(rgb, 336, rng)
  # s from [336, 420] inclusive, then top in [0, 350-336], left in [0, 525-336].
  assert rng.calls == [(336, 421), (15,), (190,)]
  resized = np.asarray(Image.fromarray(rgb).resize((525, 350), Image.BICUBIC))
  np.testing.assert_array_equal(out, resized[5:5 + 336, 7:7 + 336])


def test_resize_short_side_box_halves_first():
  rgb = np.random.default_rng(1).integers(0, 256, (900, 1000, 3), dtype=np.uint8)
  out = transforms.resize_short_side(rgb, 200)  # 900 >= 400: halve twice (450x500, 225x250)
  im = Image.fromarray(rgb).resize((500, 450), Image.BOX).resize((250, 225), Image.BOX)
  np.testing.assert_array_equal(out, np.asarray(im.resize((222, 200), Image.BICUBIC)))
  for shape in [(40, 33), (33, 40), (20, 20), (700, 90)]:
    assert min(transforms.resize_short_side(np.zeros(shape + (3,), np.uint8), S).shape[:2]) == S


def test_train_and_eval_transform_shapes_ranges_flip():
  rgb = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
  for seed in range(5):
    out = transforms.train_transform(rgb, S, np.random.default_rng(seed))
    assert out.shape == (S, S, 3) and out.dtype == np.float32
    assert -1 <= out.min() and out.max() <= 1
  arr = np.arange(12).reshape(2, 2, 3)
  np.testing.assert_array_equal(transforms.random_flip(arr, _FakeRng([], 0.2)), arr[:, ::-1])
  np.testing.assert_array_equal(transforms.random_flip(arr, _FakeRng([], 0.7)), arr)
  ev = transforms.eval_transform(rgb, S)
  assert ev.shape == (S, S, 3) and ev.dtype == np.float32
  np.testing.assert_array_equal(ev, transforms.center_crop_arr(rgb, S) / np.float32(127.5) - 1)


# ----------------------------------------------------------------------------------------------
# Demo source.
# ----------------------------------------------------------------------------------------------

def _demo_cfg(**kw):
  return ip.default_input_config("demo", image_size=S, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def test_demo_labels_are_photo_indices():
  from vfmtok_jax.data import demo_photos  # pylint: disable=g-import-not-at-top
  n = len(demo_photos.photo_names())
  it = ip.make_train_iterator(_demo_cfg(), global_batch_size=n, seed=0)
  b = next(it)
  assert b["image"].shape == (n, S, S, 3) and b["image"].dtype == np.float32
  assert b["label"].dtype == np.int32 and -1 <= b["image"].min() and b["image"].max() <= 1
  assert sorted(b["label"].tolist()) == list(range(n))  # epoch 0 = a permutation of the photos
  # The image of label p is photo p's crop, its randomness from (seed, stream position).
  p = int(b["label"][0])
  rng = np.random.default_rng([0, ip._AUG, 0])
  np.testing.assert_array_equal(b["image"][0], transforms.train_transform(
      ip._demo_photos()[p][1], S, rng))


def test_demo_heldout_set_is_fixed():
  cfg = _demo_cfg(demo_eval_crops=3)
  ev = ip.make_eval_batches(cfg, global_batch_size=8)
  n = len(ip._demo_photos()) * 3
  assert ev.num_examples == n and ev.num_batches == -(-n // 8) == len(ev)
  first = list(ev)
  _assert_batches_equal(first, list(ev))  # re-iterable, same every time
  _assert_batches_equal(first, list(ip.make_eval_batches(cfg, global_batch_size=8)))
  mask = np.concatenate([b["_mask"] for b in first])
  labels = np.concatenate([b["label"] for b in first])[mask]
  assert mask.sum() == n and labels.tolist() == [i // 3 for i in range(n)]
  images = np.concatenate([b["image"] for b in first])
  assert not images[~mask].any()  # padding is zeros
  # crop 0 is the centre crop; the crops of one photo differ
  photo0 = ip._demo_photos()[0][1]
  np.testing.assert_array_equal(images[0], transforms.eval_transform(photo0, S))
  assert not np.array_equal(images[0], images[1])
  other = list(ip.make_eval_batches(_demo_cfg(demo_eval_crops=3, demo_eval_seed=1),
                                    global_batch_size=8))
  assert not np.array_equal(other[0]["image"][1], images[1])


def test_demo_determinism_and_restore():
  cfg = _demo_cfg()
  full = _take(ip.make_train_iterator(cfg, global_batch_size=5, seed=3), 7)  # spans 3 epochs
  _assert_batches_equal(full, _take(ip.make_train_iterator(cfg, global_batch_size=5, seed=3), 7))
  for k in (1, 2, 5):
    it = ip.make_train_iterator(cfg, global_batch_size=5, seed=3, start_step=k)
    _assert_batches_equal(full[k:], _take(it, 7 - k))
    assert it.step == 7
  other = _take(ip.make_train_iterator(cfg, global_batch_size=5, seed=4), 2)
  assert not np.array_equal(other[0]["image"], full[0]["image"])


def test_demo_process_shards_disjoint_and_cover():
  n = len(ip._demo_photos())
  seen, batches = [], set()
  for pi in range(3):
    it = ip.make_train_iterator(_demo_cfg(), global_batch_size=3 * (n // 3), seed=0,
                                process_index=pi, process_count=3)
    seen.append(set(next(it)["label"].tolist()))  # local batch = the shard's epoch 0
    ev = ip.make_eval_batches(_demo_cfg(), global_batch_size=9, process_index=pi,
                              process_count=3)
    batches.add(ev.num_batches)
  assert set().union(*seen) == set(range(n)) and sum(map(len, seen)) == n
  assert len(batches) == 1  # every process runs the same number of eval batches


# ----------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------

def test_unknown_dataset_forms():
  with pytest.raises(ValueError, match="accepted: 'demo', 'imagenet2012', 'tfds:<name>'"):
    ip.make_train_iterator(ip.default_input_config("hf:foo"), global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match="no_such_dataset_xyz"):
    ip.make_train_iterator(ip.default_input_config("tfds:no_such_dataset_xyz"),
                           global_batch_size=2, seed=0)
  with pytest.raises(KeyError, match="num_worker"):
    ip.default_input_config("demo", num_worker=3)


def test_batch_not_divisible_by_processes():
  with pytest.raises(ValueError, match=r"global batch size 10 .* process count 4"):
    ip.make_train_iterator(_demo_cfg(), global_batch_size=10, seed=0, process_index=0,
                           process_count=4)
  with pytest.raises(ValueError, match=r"global batch size 6 .* process count 4"):
    ip.make_eval_batches(_demo_cfg(), global_batch_size=6, process_index=1, process_count=4)


def test_tfds_not_prepared_says_how(tmp_path):
  cfg = ip.default_input_config("imagenet2012", image_size=S, data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not prepared.*tfds build imagenet2012"):
    ip.make_train_iterator(cfg, global_batch_size=2, seed=0)


def test_prepare_dataset_only_imagenet_from_manual_dir(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="only prepares imagenet2012"):
    ip.prepare_dataset(ip.default_input_config("tfds:mnist"))
  with pytest.raises(ValueError, match="manual_dir"):
    ip.prepare_dataset(ip.default_input_config("imagenet2012"))
  with tfds.testing.mock_data(num_examples=1):  # download_and_prepare is a no-op here
    ip.prepare_dataset(ip.default_input_config("imagenet2012", manual_dir=str(tmp_path),
                                               data_dir=str(tmp_path)))


# ----------------------------------------------------------------------------------------------
# Global arrays on the 8-device CPU mesh.
# ----------------------------------------------------------------------------------------------

def test_global_arrays_on_mesh():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec
  cfg = _demo_cfg()
  ref = _take(ip.make_train_iterator(cfg, global_batch_size=16, seed=0), 2)
  for spec in (P("data"), P("data", None, None, None)):
    sharding = jax.sharding.NamedSharding(mesh, spec)
    it = ip.make_train_iterator(cfg, global_batch_size=16, seed=0, sharding=sharding)
    got = _take(it, 2)
    assert it.step == 2  # the batch already on its way to the devices is not counted
    for g, r in zip(got, ref):
      assert isinstance(g["image"], jax.Array)
      assert g["image"].sharding.shard_shape(g["image"].shape) == (2, S, S, 3)
      assert g["label"].sharding.shard_shape(g["label"].shape) == (2,)
      np.testing.assert_array_equal(np.asarray(g["image"]), r["image"])
      np.testing.assert_array_equal(np.asarray(g["label"]), r["label"])
  ev = next(iter(ip.make_eval_batches(cfg, global_batch_size=16,
                                      sharding=jax.sharding.NamedSharding(mesh, P("data")))))
  assert ev["_mask"].sharding.shard_shape(ev["_mask"].shape) == (2,)


# ----------------------------------------------------------------------------------------------
# Image folder (tfds ImageFolder layout).
# ----------------------------------------------------------------------------------------------

def _write_folder(root, counts, split="train", start=0):
  """Uniform images whose grey value 10*i identifies example i; returns {value: label name}."""
  ids, i = {}, start
  for cls, n in counts.items():
    os.makedirs(root / split / cls, exist_ok=True)
    for j in range(n):
      shape = (24 + 3 * j, 40 - 2 * j, 3)
      Image.fromarray(np.full(shape, 10 * i, np.uint8)).save(root / split / cls / f"{j}.png")
      ids[10 * i] = cls
      i += 1
  return ids


def _values(batch):
  """The identifying grey value of each real example of a batch."""
  img = np.asarray(batch["image"])
  vals = np.rint((img[:, 0, 0, 0] + 1) * 127.5).astype(int)
  return vals[np.asarray(batch.get("_mask", np.ones(len(vals), bool)))].tolist()


def test_folder_source_restore_and_shards(tmp_path):
  ids = _write_folder(tmp_path, {"cat": 4, "dog": 3, "eel": 3})
  _write_folder(tmp_path, {"cat": 2, "dog": 2}, split="val", start=10)
  cfg = ip.default_input_config(f"folder:{tmp_path}", image_size=S)
  it = ip.make_train_iterator(cfg, global_batch_size=10, seed=0)
  b = next(it)
  names = ["cat", "dog", "eel"]
  assert sorted(_values(b)) == sorted(ids)  # one epoch = every image once
  assert [names[l] for l in b["label"]] == [ids[v] for v in _values(b)]
  full = _take(ip.make_train_iterator(cfg, global_batch_size=4, seed=0), 6)
  _assert_batches_equal(full[3:], _take(ip.make_train_iterator(
      cfg, global_batch_size=4, seed=0, start_step=3), 3))
  # per-process: eval shards disjoint and covering, same number of batches everywhere
  got, nb = [], set()
  for pi in range(3):
    ev = ip.make_eval_batches(cfg, global_batch_size=3, process_index=pi, process_count=3)
    got.append([v for batch in ev for v in _values(batch)])
    nb.add(ev.num_batches)
  assert sorted(sum(got, [])) == [10 * i for i in range(10, 14)] and len(nb) == 1
  with pytest.raises(ValueError, match="no split 'test'"):
    ip.make_eval_batches(cfg, global_batch_size=2, split="test")


def test_folder_corrupt_image(tmp_path):
  _write_folder(tmp_path, {"a": 3, "b": 2})
  bad = tmp_path / "train" / "b" / "broken.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
  cfg = ip.default_input_config(f"folder:{tmp_path}", image_size=S)
  with pytest.raises(ip.CorruptImageError, match="broken.jpg"):
    next(ip.make_train_iterator(cfg, global_batch_size=6, seed=0))
  cfg.skip_corrupt = True
  it = ip.make_train_iterator(cfg, global_batch_size=6, seed=0)
  batch = next(it)
  assert it.num_skipped == 1 and batch["image"].shape == (6, S, S, 3)
  assert len(set(_values(batch))) == 5  # the corrupt slot holds a copy of a good image
  cfg.eval_split = "train"
  ev = ip.make_eval_batches(cfg, global_batch_size=4)
  masks = np.concatenate([b["_mask"] for b in ev])
  assert masks.sum() == 5 and ev.num_skipped == 1


# ----------------------------------------------------------------------------------------------
# tfds: mocked cifar10 / imagenet2012, and a tiny real tfds dataset for the even splits.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["tfds:cifar10", "imagenet2012"])
def test_tfds_mock_restore(dataset):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=10):
    cfg = ip.default_input_config(dataset, image_size=S)
    full = _take(ip.make_train_iterator(cfg, global_batch_size=4, seed=1), 6)  # 2.4 epochs
    for b in full:
      assert b["image"].shape == (4, S, S, 3) and b["label"].dtype == np.int32
    _assert_batches_equal(full[3:], _take(ip.make_train_iterator(
        cfg, global_batch_size=4, seed=1, start_step=3), 3))
    assert not np.array_equal(full[0]["label"], full[2]["label"]) or not np.array_equal(
        full[0]["image"], full[2]["image"])
    ev = ip.make_eval_batches(cfg, global_batch_size=4)
    assert ev.num_batches == 3 and sum(int(b["_mask"].sum()) for b in ev) == 10


_TINY = 23


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  """A real (prepared, on-disk) tfds dataset of uniform images, value 10*i for example i."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class VfmtokTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(_TINY)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": np.full((20 + i, 30, 3), 10 * i, np.uint8), "label": i % 3}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  VfmtokTinyImages(data_dir=data_dir).download_and_prepare(file_format="array_record")
  tfrecord_dir = str(tmp_path_factory.mktemp("tfds_tfrecord"))
  VfmtokTinyImages(data_dir=tfrecord_dir).download_and_prepare()
  return data_dir, tfrecord_dir


def test_tfds_array_record_source(tiny_tfds):
  data_dir, tfrecord_dir = tiny_tfds
  cfg = ip.default_input_config("tfds:vfmtok_tiny_images", image_size=S, data_dir=data_dir,
                                eval_split="train")
  shards, nb = [], set()
  for pi in range(3):
    ev = ip.make_eval_batches(cfg, global_batch_size=6, process_index=pi, process_count=3)
    shards.append([v for b in ev for v in _values(b)])
    nb.add(ev.num_batches)
  assert sorted(sum(shards, [])) == [10 * i for i in range(_TINY)]  # disjoint and covering
  assert len(nb) == 1
  it = ip.make_train_iterator(cfg, global_batch_size=6, seed=5)
  assert it.num_examples == _TINY
  full = _take(it, 6)
  stream = [v for b in full for v in _values(b)]
  assert sorted(stream[:_TINY]) == [10 * i for i in range(_TINY)]  # epoch 0: each once
  assert stream[_TINY:2 * _TINY] != stream[:_TINY]  # epoch 1: another order
  _assert_batches_equal(full[4:], _take(ip.make_train_iterator(
      cfg, global_batch_size=6, seed=5, start_step=4), 2))
  cfg.data_dir = tfrecord_dir
  with pytest.raises(ValueError, match="prepared as tfrecord.*--file_format=array_record"):
    ip.make_train_iterator(cfg, global_batch_size=6, seed=5)


# ----------------------------------------------------------------------------------------------
# Order at pod scale: process counts, restore cost, decoding workers.
# ----------------------------------------------------------------------------------------------

def _global_batches(cfg, processes: int, steps: int, start_step: int = 0, batch: int = 8):
  """The global batches as `processes` hosts would assemble them (process-major)."""
  its = [ip.make_train_iterator(cfg, global_batch_size=batch, seed=2, start_step=start_step,
                                process_index=p, process_count=processes)
         for p in range(processes)]
  return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
          for parts in zip(*(_take(it, steps) for it in its))]


def test_global_batches_do_not_depend_on_the_process_count():
  """Global batch t is the same on 1, 2 and 4 hosts, and a run resumed at step k on another
  host count continues the same stream (the demo's 12 photos: 4 steps span 2.7 epochs)."""
  cfg = _demo_cfg()
  one = _global_batches(cfg, 1, 4)
  for processes in (2, 4):
    _assert_batches_equal(one, _global_batches(cfg, processes, 4))
  _assert_batches_equal(one[2:], _global_batches(cfg, 4, 2, start_step=2))
  _assert_batches_equal(one[1:], _global_batches(cfg, 2, 3, start_step=1))


# (start step, steps) of each launch: 2 processes from step 0 and resumed at step 2; 4 processes
# resumed at step 2 only (one launch: the suite's time).
@pytest.mark.parametrize("processes,devices_each,launches", [(2, 2, ((0, 2), (2, 2))),
                                                             (4, 1, ((2, 2),))],
                         ids=["2x2", "4x1"])
def test_real_processes_read_the_one_process_batches(tmp_path, processes, devices_each, launches):
  """2 processes x 2 devices and 4 processes x 1 device (jax.distributed on loopback) assemble
  the global batches one process reads: the same stream on another process count, and resumed
  there."""
  from tests import input_processes  # pylint: disable=g-import-not-at-top
  from tests.test_sample_cli import run_processes  # pylint: disable=g-import-not-at-top
  cfg = ip.default_input_config("demo", image_size=input_processes.IMAGE_SIZE)
  one = _take(ip.make_train_iterator(cfg, global_batch_size=input_processes.BATCH,
                                     seed=input_processes.SEED), 4)
  for start, steps in launches:
    out = tmp_path / f"from{start}.npz"
    run_processes(["-m", "tests.input_processes", str(out), str(start), str(steps),
                   str(processes)], processes=processes, devices_each=devices_each,
                  tmp_path=tmp_path)
    with np.load(out) as got:
      for i, want in enumerate(one[start:start + steps]):
        np.testing.assert_array_equal(got["image"][i], want["image"])
        np.testing.assert_array_equal(got["label"][i], want["label"])


class _CountingSource(ip._ListSource):  # pylint: disable=protected-access
  def __init__(self, source):
    super().__init__([source[i] for i in range(len(source))], source.load)
    self.reads = 0

  def __getitem__(self, index):
    self.reads += 1
    return super().__getitem__(index)


@pytest.mark.parametrize("start_step", [10, 100_000])
def test_restore_reads_only_the_first_batch(start_step):
  """Resuming at step 100,000 costs what resuming at step 10 costs: the first batch's records
  and nothing before them (synchronous reads, so nothing is read ahead either)."""
  cfg = _demo_cfg(num_threads=0, prefetch=0)
  source = _CountingSource(ip._open_source(cfg, train=True))  # pylint: disable=protected-access
  ds = ip.train_dataset(cfg, source, global_batch_size=8, seed=2, start_step=start_step,
                        process_index=1, process_count=2)
  batch = next(iter(ds))
  assert source.reads == 4 and batch["image"].shape[0] == 4
  want = _global_batches(cfg, 1, 1, start_step=start_step)[0]
  np.testing.assert_array_equal(batch["image"], want["image"][4:])


def test_decoding_workers_give_the_same_batches():
  cfg = _demo_cfg()
  want = _take(ip.make_train_iterator(cfg, global_batch_size=4, seed=1, start_step=2), 3)
  with ip.make_train_iterator(_demo_cfg(num_workers=2), global_batch_size=4, seed=1,
                              start_step=2) as it:
    _assert_batches_equal(want, _take(it, 3))
