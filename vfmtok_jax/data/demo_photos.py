"""Real photos that ship inside installed wheels: no network, ever.

Every photo is read with PIL straight from the package's own data folder (scikit-image's
bundled `skimage/data/*`, scikit-learn's `datasets/images/*`, matplotlib's `mpl-data/
sample_data/*`), never through `skimage.data.<name>()`, whose pooch fetcher may try to download
images that are not in the wheel. A missing file raises FileNotFoundError naming the package.

  name                   package       file                       size (w x h)
  astronaut              scikit-image  astronaut.png              512 x 512
  coffee                 scikit-image  coffee.png                 600 x 400
  chelsea                scikit-image  chelsea.png                451 x 300
  rocket                 scikit-image  rocket.jpg                 640 x 427
  motorcycle_left        scikit-image  motorcycle_left.png        741 x 500  (stereo pair,
  motorcycle_right       scikit-image  motorcycle_right.png       741 x 500   same scene)
  immunohistochemistry   scikit-image  ihc.png                    512 x 512
  hubble_deep_field      scikit-image  hubble_deep_field.jpg      1000 x 872
  retina                 scikit-image  retina.jpg                 1411 x 1411
  china                  scikit-learn  china.jpg                  640 x 427
  flower                 scikit-learn  flower.jpg                 640 x 427
  grace_hopper           matplotlib    grace_hopper.jpg           512 x 600
"""

from __future__ import annotations

import importlib
import os
from typing import Sequence

import numpy as np

# name -> (importable package whose folder holds the file, path inside that folder).
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage.data", "astronaut.png"),
    "coffee": ("skimage.data", "coffee.png"),
    "chelsea": ("skimage.data", "chelsea.png"),
    "rocket": ("skimage.data", "rocket.jpg"),
    "motorcycle_left": ("skimage.data", "motorcycle_left.png"),
    "motorcycle_right": ("skimage.data", "motorcycle_right.png"),
    "immunohistochemistry": ("skimage.data", "ihc.png"),
    "hubble_deep_field": ("skimage.data", "hubble_deep_field.jpg"),
    "retina": ("skimage.data", "retina.jpg"),
    "china": ("sklearn.datasets", "images/china.jpg"),
    "flower": ("sklearn.datasets", "images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}

# The two views of one scene (scikit-image's Middlebury stereo pair).
STEREO_PAIR = ("motorcycle_left", "motorcycle_right")


def photo_names() -> list[str]:
  """Names of every demo photo, in a fixed order."""
  return list(PHOTOS)


def photo_path(name: str) -> str:
  """Absolute path of a demo photo inside its installed package."""
  try:
    package, rel = PHOTOS[name]
  except KeyError:
    raise KeyError(f"unknown demo photo {name!r}; known: {photo_names()}") from None
  try:
    module = importlib.import_module(package)
  except ImportError as e:
    raise FileNotFoundError(f"demo photo {name!r} needs the package {package.split('.')[0]!r}"
                            ) from e
  path = os.path.join(os.path.dirname(module.__file__), *rel.split("/"))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"demo photo {name!r}: {path} is not in the installed "
                            f"{package.split('.')[0]} (a version without the bundled file?)")
  return path


def load_photo(name: str) -> np.ndarray:
  """One demo photo as a uint8 (H, W, 3) RGB array."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(photo_path(name)) as im:
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def demo_photos(names: Sequence[str] | None = None) -> list[tuple[str, np.ndarray]]:
  """[(name, uint8 (H, W, 3) RGB array)] for `names` (default: all of them)."""
  return [(name, load_photo(name)) for name in (photo_names() if names is None else names)]
