"""The oracle of our FID Inception: pytorch-fid's own network (`pytorch_fid.inception`), with
random weights.

pytorch-fid builds torchvision's `Inception3` and swaps in its `FIDInceptionA/C/E` blocks. Both
packages live in `.test_oracles/` (`.ci/run` installs them there with `pip install --no-deps
--target`), not in site-packages: torchvision's PyPI wheel fails beside the CPU torch in its
package `__init__` (it registers compiled ops), and transformers and kornia import it whenever
it is installed. `torchvision.models.inception` is plain Python: `_pytorch_fid` imports it under
empty parent packages, imports pytorch-fid, then takes both back out of `sys.modules` and
`sys.path`, so nothing else in the test process sees a torchvision.

`random_inception(seed)` returns a `FIDOracle`: pytorch-fid's `InceptionV3` feature extractor
(the pool features FID uses) over a `fid_inception_v3()` whose weights are random (the URL
loader is handed them instead of downloading) and whose batch-norm statistics are measured on
random images, so every layer's activations stay O(1) and the features are not degenerate. Its
`state_dict()` has the keys of pytorch-fid's released weight file. Input: normalised
(B, 3, 299, 299). Returns (pool (B, 2048), mixed_6/conv = Mixed_6d.branch1x1 output
(B, 192, 17, 17), logits without the fc bias (B, 1008)).
"""

import importlib
import importlib.metadata
import os
import sys
import types

import torch
from torch import nn
import torch.nn.functional as F

ORACLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       ".test_oracles")
INSTALL = ('pip install --no-deps --target .test_oracles "torchvision==0.28.0" '
           '"pytorch-fid==0.3.0"')


def _pytorch_fid():
  """pytorch-fid's `inception` module, torchvision's `models.inception` under it."""
  if not os.path.isdir(os.path.join(ORACLES, "pytorch_fid")):
    raise ImportError(f"pytorch-fid's oracle is not installed: run `{INSTALL}` (.ci/run does)")
  before = set(sys.modules)
  sys.path.insert(0, ORACLES)
  try:
    root = os.path.join(ORACLES, "torchvision")
    package = types.ModuleType("torchvision")
    package.__path__ = [root]
    package.__version__ = importlib.metadata.version("torchvision")  # found on ORACLES
    models = types.ModuleType("torchvision.models")
    models.__path__ = [os.path.join(root, "models")]
    package.models = models
    sys.modules["torchvision"], sys.modules["torchvision.models"] = package, models
    inception = importlib.import_module("torchvision.models.inception")
    models.inception, models.inception_v3 = inception, inception.inception_v3
    return importlib.import_module("pytorch_fid.inception")
  finally:
    sys.path.remove(ORACLES)
    for name in set(sys.modules) - before:
      if name.split(".")[0] in ("torchvision", "pytorch_fid"):
        del sys.modules[name]


fid_inception = _pytorch_fid()


class FIDOracle(nn.Module):
  """pytorch-fid's pool-feature extractor `fid` (`InceptionV3`, its own `fid_inception_v3()`
  inside), plus the Mixed_6d.branch1x1 map (sFID's features) and the no-bias logits (ADM's
  IS) from `net`, a second `fid_inception_v3()` with the same weights (the extractor drops
  the fc layer)."""

  def __init__(self, net, fid):
    super().__init__()
    self.net, self.fid = net, fid

  def state_dict(self, *args, **kwargs):  # the released file's keys
    return self.net.state_dict(*args, **kwargs)

  @property
  def fc(self):
    return self.net.fc

  def forward(self, x):
    seen = {}
    hook = self.fid.blocks[2][6].branch1x1.register_forward_hook(
        lambda m, i, o: seen.setdefault("mixed_6_conv", o))
    try:
      pool = self.fid(x)[0].flatten(1)
    finally:
      hook.remove()
    return pool, seen["mixed_6_conv"], pool @ self.net.fc.weight.T


def _built(state) -> FIDOracle:
  """pytorch-fid's networks loading `state` where they would download the released file."""
  original = fid_inception.load_state_dict_from_url
  fid_inception.load_state_dict_from_url = lambda *a, **k: state
  try:
    return FIDOracle(fid_inception.fid_inception_v3(), fid_inception.InceptionV3(
        [fid_inception.InceptionV3.DEFAULT_BLOCK_INDEX], resize_input=False,
        normalize_input=False)).eval()
  finally:
    fid_inception.load_state_dict_from_url = original


def _untrained():
  """pytorch-fid's `fid_inception_v3()` as built, before its weights would be loaded."""
  real = nn.Module.load_state_dict
  nn.Module.load_state_dict = lambda self, *a, **k: None  # where it loads the download
  original = fid_inception.load_state_dict_from_url
  fid_inception.load_state_dict_from_url = lambda *a, **k: None
  try:
    return fid_inception.fid_inception_v3()
  finally:
    nn.Module.load_state_dict = real
    fid_inception.load_state_dict_from_url = original


def random_inception(seed: int = 0) -> FIDOracle:
  """pytorch-fid's network with random weights and data-dependent batch-norm statistics."""
  torch.manual_seed(seed)
  net = _untrained()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.normal_(0, (2.0 / fan_in) ** 0.5)
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.momentum = None  # running statistics = the average over the calibration batch
        m.reset_running_stats()
    net.fc.weight.normal_(0, 0.05)
    net.fc.bias.normal_(0, 1.0)
    net.train()
    # Batch-norm statistics of pixel noise and of smooth images (noise upsampled from 8 x 8
    # and 32 x 32, like small images the tests resize to 299).
    smooth = [F.interpolate(torch.rand(2, 3, n, n) * 2 - 1, size=(299, 299), mode="bilinear")
              for n in (8, 32)]
    net(torch.cat([torch.rand(4, 3, 299, 299) * 2 - 1, *smooth]))
  state = {k: v.clone() for k, v in net.state_dict().items()}
  return _built(state)
