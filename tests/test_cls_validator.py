"""The cls stage's validation CAM mIoU (oeem_jax.stages.cls.Validator) with "vote" and "soft"
stitching, against the same computation written out in NumPy (tiny synthetic image, fake CAM)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from oeem_jax.data import tiles
from oeem_jax.data.source import Example
from oeem_jax.engine.parallel import make_mesh
from oeem_jax.evaluation import metrics
from oeem_jax.models.network import normalize_cls
from oeem_jax.stages.cls import Validator


class _FakeClassifier:
  """CAM [N, 112, 112, 2] = (0, w * mean over RGB of the normalised input): no network."""

  def cam(self):  # only used as the `method=` marker
    raise NotImplementedError

  def apply(self, variables, x, method=None):
    assert method == self.cam
    g = variables["w"] * x.mean(axis=-1)
    return jnp.stack([jnp.zeros_like(g), g], axis=-1)


def _example():
  # A solid gland block over the top-left 168 x 168: the tiles inside it are labelled gland only,
  # those beside it both classes, those far right non-gland only. Noise image: the fake CAM is
  # uninformative, so where a gland-only tile overlaps a two-class tile the vote ties (-> non-gland)
  # and the soft mean follows the confident gland-only tile.
  rng = np.random.default_rng(0)
  h, w = 224, 336
  mask = np.zeros((h, w), np.uint8)
  mask[:168, :168] = 1
  image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
  return Example(name="train_x", image=image, mask=mask, grade="benign", patient="p")


class _DataCfg:
  tile_size, tile_stride, label_threshold = 112, 56, 0.05


def _numpy_cam_miou(ex, w, stitch, temperature):
  t, labels = tiles.example_tiles(ex, 112, 56, 0.05)
  g = w * np.asarray(normalize_cls(t.astype(np.float32))).mean(axis=-1)  # [T, 112, 112]
  both, only_gland = (labels[:, 0] > 0) & (labels[:, 1] > 0), (labels[:, 1] > 0) & (labels[:, 0] == 0)
  p = np.where(both[:, None, None], 1 / (1 + np.exp(-g / temperature)), only_gland[:, None, None] * 1.0)
  boxes = tiles.tile_boxes(*ex.mask.shape, 112, 56)
  if stitch == "soft":
    mask = tiles.stitch_probabilities(np.stack([1 - p, p], axis=-1), boxes, *ex.mask.shape)
  else:
    mask = tiles.stitch_masks(p > 0.5, boxes, *ex.mask.shape)
  return metrics.pixel_metrics(metrics.confusion_matrix(mask, (ex.mask > 0).astype(np.uint8)))["miou"]


def test_validator_cam_miou_follows_the_stitch_mode():
  ex, model = _example(), _FakeClassifier()
  variables = {"w": jnp.float32(3.0)}
  got = {}
  for stitch in ("vote", "soft"):
    v = Validator(model, [ex], _DataCfg, input_size=112, batch_size=4, mesh=make_mesh(), num_images=0,
                  stitch=stitch, stitch_temperature=8.0)
    got[stitch] = v(variables, step=0).metrics["cam_miou"]
    assert got[stitch] == pytest.approx(_numpy_cam_miou(ex, 3.0, stitch, 8.0), abs=1e-6)
  assert got["soft"] != pytest.approx(got["vote"], abs=1e-3)  # the mode is really used
  # Another mode is refused by the config check, once, before the stage runs (the stage does not
  # check it again).
  from oeem_jax import errors
  from oeem_jax.config import check as config_check
  from oeem_jax.config.base import load_config_file
  c = load_config_file("cls").get_config("cpu")
  c.cls.stitch = "mean"
  with pytest.raises(errors.ConfigError, match="config key cls.stitch: 'mean'; expected one of vote, soft"):
    config_check.validate(c)
