"""The network contract: what a network takes as input and how a later stage rebuilds a trained one.

Free of TensorFlow: loading a trained network (predict, eval, export) imports none. (What reads
GlaS still does, through TFDS: `data.loader`; and host-side rescaling uses `tf.image.resize`:
`evaluation.inference.resize_bilinear_host`.)

* Input normalisation of both networks (`normalize`, `normalizer`, `input_stats`).
* `trained_network`: a training stage's network rebuilt from its network card
  (`models.factory.network_card` / `network_from_card`, written beside the checkpoints).
* `ImageNetInit` / `imagenet_init_hook`: `model.init_checkpoint` loaded into the backbone.

Normalisation (docs/reference.md §1):
* classification: RGB scaled to [0, 1], then `(x - CLS_MEAN) / CLS_STD` with the reference's GlaS
  constants. Measured on the 85 GlaS train images (stage `prepare`, `rgb_stats["train+val"]`, 0..1 RGB,
  pixel-weighted): mean (0.7878, 0.5120, 0.7849), std (0.1677, 0.2484, 0.1323); the reference's values
  agree to within 0.002.
* segmentation: RGB in 0..255, `(x - SEG_MEAN) / SEG_STD` with the ImageNet statistics (mmseg's
  `to_rgb=True` with the RGB-ordered constants).
* EfficientNet-Lite backbones, both stages: `(x - 127) / 128` on 0..255 RGB, what their ImageNet
  weights were trained with (`input_stats`); the two above stay ResNet38's, as in the reference.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from absl import logging

from oeem_jax.models import factory
from oeem_jax.runtime import artifacts

if TYPE_CHECKING:  # annotations only: importing this module needs no ml_collections
  import ml_collections

CLS_MEAN = np.array([0.787, 0.511, 0.785], np.float32)
CLS_STD = np.array([0.167, 0.248, 0.131], np.float32)
SEG_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
SEG_STD = np.array([58.395, 57.12, 57.375], np.float32)


def _as_float32(x):
  tf = sys.modules.get("tensorflow")  # a TF tensor comes only from code that imported TF already
  if tf is not None and isinstance(x, (tf.Tensor, tf.Variable)):
    return tf.cast(x, tf.float32)
  if hasattr(x, "astype"):  # numpy / jax arrays
    return x.astype(np.float32)
  return np.asarray(x, np.float32)


Stats = tuple[tuple[float, float, float], tuple[float, float, float]]


def input_stats(backbone: str) -> Stats | None:
  """(mean, std) on 0..255 RGB that `backbone`'s networks take in both stages, or None for ResNet38
  (whose stages keep `normalize_cls` / `normalize_seg`, as the reference).

  EfficientNet-Lite: (127, 127, 127) / (128, 128, 128), the preprocessing its ImageNet weights were
  trained with (TensorFlow's EfficientNet-Lite builder).
  """
  if backbone.startswith("efficientnet_lite"):
    return ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))
  return None


def _normalize_stats(x, stats: Stats):
  mean = np.asarray(stats[0], np.float32)
  inv_std = np.float32(1.0) / np.asarray(stats[1], np.float32)
  return (x - mean) * inv_std


def normalize(image, kind: str, stats: Stats | None = None):
  """Input normalisation of either network (docs/reference.md §1).

  Args:
    image: uint8 (or float in 0..255) RGB [..., 3], NumPy, JAX or TF.
    kind: "cls": `(image / 255 - CLS_MEAN) / CLS_STD` (GlaS statistics on 0..1 RGB; values roughly
      in [-5, 2]); "seg": `(image - SEG_MEAN) / SEG_STD` (ImageNet statistics on 0..255 RGB;
      roughly [-2.2, 2.7]).
    stats: (mean, std) on 0..255 RGB (`input_stats`, e.g. ImageNet's for a pretrained backbone)
      replacing either default: `(image - mean) / std`.

  Returns:
    float32 [..., 3] of the same array type.
  """
  x = _as_float32(image)
  if stats is not None:
    return _normalize_stats(x, stats)
  if kind == "cls":
    return (x * np.float32(1.0 / 255.0) - CLS_MEAN) / CLS_STD
  return (x - SEG_MEAN) / SEG_STD


def normalize_cls(image, stats: Stats | None = None):
  """`normalize(image, "cls", stats)`: the classifier's input."""
  return normalize(image, "cls", stats)


def normalize_seg(image, stats: Stats | None = None):
  """`normalize(image, "seg", stats)`: the segmenter's input."""
  return normalize(image, "seg", stats)


@functools.lru_cache(maxsize=None)
def normalizer(kind: str, stats: Stats | None = None):
  """One function object per (kind, stats): `normalize_cls` or `normalize_seg` with `stats` bound
  (hashable, so jit caches keyed on it compile once)."""
  fn = {"cls": normalize_cls, "seg": normalize_seg}[kind]
  return fn if stats is None else functools.partial(fn, stats=stats)


class ImageNetInit:
  """`engine.train.Task.pretrained` hook loading `model.init_checkpoint` into the backbone.

  ResNet38: the reference's `res38d.pth` (`import_torch.load_res38d`); EfficientNet-Lite0: the name
  "efficientnet_lite0" or a .pth path (`import_torch.load_efficientnet_lite`, converted once and
  cached under the data cache). Non-strict, as the reference (paper §2.3, docs: ImageNet heads
  dropped). After a call, `report` holds the counts and the names of the missing / unexpected keys
  for the stage summary.
  """

  def __init__(self, config: ml_collections.ConfigDict, stage: str):
    from oeem_jax.models import classifier

    self.stage = stage
    self.spec = str(config.model.init_checkpoint)
    self.backbone = classifier.check_backbone(str(config.model.get("backbone", "resnet38")))
    self.cache_dir = None
    self.report: dict[str, Any] = {}
    if self.backbone == "resnet38":
      path = Path(self.spec).expanduser()
      if not path.is_file():
        raise FileNotFoundError(f"config key model.init_checkpoint: {path} does not exist (expected "
                                "the reference's res38d.pth for model.backbone 'resnet38')")
    else:
      from oeem_jax.models.import_torch import resolve_pretrained
      from oeem_jax.runtime.io_utils import cache_root

      resolve_pretrained(self.spec)  # fail before any training starts: missing package or file
      self.cache_dir = cache_root(config.data)

  def __call__(self, variables):
    from oeem_jax.models import import_torch

    if self.backbone == "resnet38":
      new, report = import_torch.load_res38d(self.spec, variables)
    else:
      new, report = import_torch.load_efficientnet_lite(self.spec, variables, cache_dir=self.cache_dir)
    self.report = {"source": self.spec, "backbone": self.backbone,
                   "num_used": len(report["used"]), "missing": report["missing"],
                   "unexpected": report["unexpected"]}
    logging.info("%s: loaded %d ImageNet tensors from %s into the %s backbone (missing %d, "
                 "unexpected %d: %s)", self.stage, len(report["used"]), self.spec, self.backbone,
                 len(report["missing"]), len(report["unexpected"]),
                 ", ".join(report["unexpected"][:4]) + (" ..." if len(report["unexpected"]) > 4 else ""))
    return new


def imagenet_init_hook(config: ml_collections.ConfigDict, stage: str) -> ImageNetInit | None:
  """An `ImageNetInit` hook for `model.init_checkpoint`, or None when that key is empty.

  Raises:
    FileNotFoundError: `model.init_checkpoint` names a file that does not exist.
    ImportError: a named weight package (or torch) is not installed; the message gives the pip command.
    ValueError: unknown `model.backbone`.
  """
  if not config.model.get("init_checkpoint", ""):
    return None
  return ImageNetInit(config, stage)


def config_input_stats(config: ml_collections.ConfigDict) -> Stats | None:
  """Input normalisation (mean, std) on 0..255 RGB of `config.model.backbone` for every stage that
  feeds its networks (`input_stats`); None = ResNet38's per-stage defaults."""
  return input_stats(str(config.model.get("backbone", "resnet38")))


# What a training stage's network takes as input when its folder has no network card (older runs).
_INPUT_SIZE_KEY = {"cls": "input_size", "seg": "crop_size"}


@dataclasses.dataclass(frozen=True)
class TrainedNetwork:
  """A training stage's network, rebuilt for a later stage.

  Attributes:
    model: the flax module (`CAMClassifier` for cls, `PSPNet` for seg) with the constructor arguments
      it trained with.
    normalize: uint8 / float 0..255 RGB [..., 3] -> float32 network input, as in training.
    input_size: side in pixels of the training inputs (cls: tiles, seg: crops).
    card: the network card (`models.factory.network_card`) it was built from.
  """
  model: Any
  normalize: Callable[[Any], Any]
  input_size: int
  card: dict[str, Any]


def trained_network(train_stage_dir: str | Path, stage: str) -> TrainedNetwork:
  """Rebuilds the network a training stage (`stage` = "cls" or "seg") trained in `train_stage_dir`.

  Reads `network.json`, which the stage writes beside its checkpoints when training starts
  (`artifacts.read_network_card`), so an unfinished or preempted run works too. A folder of an
  older version without it falls back to the config in its `summary.json`.

  Raises:
    FileNotFoundError: the folder has neither file (not a `stage` training folder).
    ValueError: an unreadable card, a card of another stage, or arguments the network does not take.
  """

  folder = Path(train_stage_dir)
  card = artifacts.read_network_card(folder)
  if card is None:
    trained = artifacts.training_config(folder)
    if trained is None:
      raise FileNotFoundError(
          f"{folder}: no {artifacts.network_card_path(folder).name} and no summary.json; expected the "
          f"folder of a {stage} training stage (python -m oeem_jax.main --config=configs/{stage}.py ...)")
    logging.info("%s has no network card (an older run): the network comes from its summary.json", folder)
    make = factory.make_classifier if stage == "cls" else factory.make_segmenter
    card = factory.network_card(make(trained), input_kind=stage, input_stats=config_input_stats(trained),
                                input_size=int(trained[stage][_INPUT_SIZE_KEY[stage]]))
  kind = card.get("input", {}).get("kind")
  if kind != stage:
    raise ValueError(f"{artifacts.network_card_path(folder)}: the network of a {kind!r} stage; expected "
                     f"a {stage!r} stage folder")
  stats = card["input"].get("stats")
  return TrainedNetwork(model=factory.network_from_card(card),
                        normalize=normalizer(stage, None if stats is None else tuple(map(tuple, stats))),
                        input_size=int(card["input"]["size"]), card=card)
