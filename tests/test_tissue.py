"""Tests for tissue detection (oeem_jax.predict.tissue) and the window skipping it drives
(inference.predict_probs `keep`, regions.predict_mask `tissue`)."""

from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from oeem_jax.evaluation import inference
from oeem_jax.predict import regions, tissue

GLAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "glas"
GLASS = (238, 238, 242)


def test_read_thumbnail_block_means_hand_worked():
  img = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
  reads = []

  def read(y0, y1, x0, x1):
    reads.append((y0, y1, x0, x1))
    return img[y0:y1, x0:x1]

  t = tissue.read_thumbnail(read, 5, 7, 3, max_strip_bytes=1)  # one thumbnail row per strip
  assert t.shape == (2, 3, 3) and t.dtype == np.uint8
  assert reads == [(0, 3, 0, 7), (3, 5, 0, 7)]
  for i, (y0, y1) in enumerate([(0, 3), (3, 5)]):
    for j, (x0, x1) in enumerate([(0, 3), (3, 6), (6, 7)]):  # partial blocks at the border
      np.testing.assert_array_equal(t[i, j], np.rint(img[y0:y1, x0:x1].mean((0, 1))))
  assert tissue.thumbnail_factor(0.5) == 16 and tissue.thumbnail_factor(0.25) == 32
  assert tissue.thumbnail_factor(None) == 16 and tissue.thumbnail_factor(20.0) == 1


def test_saturation_hand_worked():
  rgb = np.array([[[200, 100, 50], [0, 0, 0], [128, 128, 128], [255, 0, 0]]], np.uint8)
  np.testing.assert_allclose(tissue.saturation(rgb), [[0.75, 0.0, 0.0, 1.0]], atol=1e-7)


def _slide_thumbnail(seed=0):
  """Glass with a pink tissue block (a hole inside), a speck and a pen mark; the expected mask."""
  rng = np.random.default_rng(seed)
  t = np.empty((60, 80, 3), np.uint8)
  t[:] = GLASS
  t = np.clip(t + rng.integers(-3, 4, t.shape), 0, 255).astype(np.uint8)
  t[10:40, 20:60] = (215, 120, 170)          # tissue, 30 x 40 px
  t[20:24, 30:34] = GLASS                     # a lumen: 16 px hole, filled
  t[50:52, 5:7] = (200, 100, 160)             # a 4-px speck, dropped
  t[45:48, 60:75] = (20, 20, 30)              # pen / border: dark, never tissue
  expected = np.zeros((60, 80), bool)
  expected[10:40, 20:60] = True
  return t, expected


def test_tissue_mask_finds_the_block_fills_the_hole_drops_the_speck():
  thumb, expected = _slide_thumbnail()
  # Thumbnail pixel = 8 µm: min object 1e4 µm² = 156 px (the 4-px speck goes), holes up to
  # 1.6e5 µm² = 2,500 px filled (the 16-px lumen).
  t = tissue.tissue_mask(thumb, downsample=(16.0, 16.0), mpp=0.5)
  np.testing.assert_array_equal(t.mask, expected)
  assert t.fraction == pytest.approx(expected.mean())
  # The threshold is Otsu's clamped to [MIN_THRESHOLD, MAX_THRESHOLD].
  assert t.threshold == min(max(t.otsu, tissue.MIN_THRESHOLD), tissue.MAX_THRESHOLD)
  rec = t.record()
  assert rec["thumbnail_size"] == [80, 60] and rec["downsample"] == [16.0, 16.0]
  # The speck stays when the cleaning is off, the lumen stays a hole.
  raw = tissue.tissue_mask(thumb, downsample=(16.0, 16.0), mpp=0.5, min_object_area_um2=0,
                           max_hole_area_um2=0)
  assert raw.mask[50:52, 5:7].all() and not raw.mask[20:24, 30:34].any()
  assert not raw.mask[45:48, 60:75].any()  # dark pixels are never tissue


def test_glass_only_and_constant_thumbnails_have_no_tissue():
  rng = np.random.default_rng(1)
  glass = np.clip(np.full((40, 50, 3), GLASS) + rng.integers(-3, 4, (40, 50, 3)), 0, 255)
  t = tissue.tissue_mask(glass.astype(np.uint8))
  # Otsu of glass noise is clamped up; the glass (it touches the border) is no "hole" to fill.
  assert t.fraction == 0.0 and t.threshold == tissue.MIN_THRESHOLD
  flat = tissue.tissue_mask(np.full((8, 8, 3), 200, np.uint8))
  assert math.isnan(flat.otsu) and flat.fraction == 0.0 and flat.record()["otsu"] is None


def test_tissue_mask_errors():
  with pytest.raises(ValueError, match="uint8"):
    tissue.tissue_mask(np.zeros((4, 4), np.uint8))
  with pytest.raises(ValueError, match="downsample"):
    tissue.tissue_mask(np.zeros((4, 4, 3), np.uint8), downsample=(0.5, 1.0))
  with pytest.raises(ValueError, match="thresholds"):
    tissue.tissue_mask(np.zeros((4, 4, 3), np.uint8), min_threshold=0.3, max_threshold=0.2)


def test_window_filter_hand_worked():
  mask = np.zeros((4, 4), bool)
  mask[1, 2] = True  # input rows 10..20, columns 20..30 at downsample 10
  t = tissue.TissueMask(mask=mask, downsample=(10.0, 10.0), threshold=0.1, otsu=0.2, fraction=1 / 16)
  f = tissue.WindowFilter(t, 40, 40)
  assert f.any_tissue(10, 20, 20, 30) and f.any_tissue(15, 16, 29, 31)
  assert not f.any_tissue(0, 10, 0, 40)       # the row above
  assert not f.any_tissue(20, 40, 0, 40)      # the rows below
  assert not f.any_tissue(0, 40, 30, 40)      # the columns to the right
  assert not f.any_tissue(-50, -10, 0, 40)    # outside the image
  g = tissue.WindowFilter(t, 40, 40, margin=3)
  assert g.any_tissue(0, 7.5, 0, 40) and not g.any_tissue(0, 6.9, 0, 40)


def pointwise(x):
  # A per-pixel linear map 3 -> 2: every window gives a pixel the same logits.
  w = jnp.asarray([[0.5, -1.0], [0.25, 2.0], [-0.75, 0.5]], jnp.float32)
  return jnp.einsum("bhwc,cd->bhwd", x, w) + jnp.asarray([0.1, -0.2])


def identity(x):
  return (x - 128.0) / 64.0


def test_keep_all_windows_is_bit_identical_and_skipped_pixels_are_class_0():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (70, 90, 3)).astype(np.uint8)
  kw = dict(normalize=identity, scales=(1.0, 1.5), flip=True, window=32, stride=24, batch_size=4)
  ref = inference.predict_probs(pointwise, img, **kw)
  same = inference.predict_probs(pointwise, img, keep=lambda *b: True, num_classes=2, **kw)
  np.testing.assert_array_equal(same, ref)
  # Refuse every window that reaches column 60 or beyond (image pixels).
  calls = []

  def left(y0, y1, x0, x1):
    calls.append((y0, y1, x0, x1))
    return x1 <= 60

  part = inference.predict_probs(pointwise, img, keep=left, num_classes=2, **kw)
  # Pointwise network: a pixel that any run window covers has the same logits as without skipping
  # (a mean of equal values); at scale 1 (unflipped and flipped) those are columns < 48 (the
  # windows at x = 0 and 24), so the average over both scales matches there only where the 1.5
  # windows also ran. Pixels no run window covers get class 0.
  assert calls and any(not left(*c) for c in calls[:5] + calls[-5:])
  np.testing.assert_allclose(part[:, :30], ref[:, :30], atol=1e-6)
  assert (part[:, 60:, 0] > 1 - 1e-6).all()
  np.testing.assert_allclose(part.sum(-1), 1.0, atol=1e-6)
  none = inference.predict_probs(pointwise, img, keep=lambda *b: False, num_classes=2, **kw)
  assert (none[..., 0] > 1 - 1e-6).all()
  with pytest.raises(ValueError, match="num_classes"):
    inference.predict_probs(pointwise, img, keep=left, **kw)


def test_predict_mask_with_tissue_equals_eval_on_tissue_and_skips_glass():
  rng = np.random.default_rng(2)
  h, w = 150, 200
  img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
  kw = dict(normalize=identity, scales=(1.0,), flip=True, window=32, stride=24, batch_size=4,
            region_size=64)
  reads = []

  def read(y0, y1, x0, x1):
    reads.append((y0, y1, x0, x1))
    return img[y0:y1, x0:x1]

  ref = regions.predict_mask(pointwise, read, h, w, **kw)
  n_ref = len(reads)
  mask = np.zeros((15, 20), bool)
  mask[2:5, 3:8] = True  # input rows 20..50, columns 30..80 at downsample 10
  t = tissue.TissueMask(mask=mask, downsample=(10.0, 10.0), threshold=0.1, otsu=0.2,
                        fraction=float(mask.mean()))
  reads.clear()
  stats = {}
  out = regions.predict_mask(pointwise, read, h, w, tissue=tissue.WindowFilter(t, h, w),
                             stats=stats, **kw)
  np.testing.assert_array_equal(out[20:50, 30:80], ref[20:50, 30:80])  # the tissue: as eval
  assert not out[:, 120:].any() and not out[90:].any()  # far from it: class 0
  assert 0 < len(reads) < n_ref  # regions of glass only are never read
  assert stats["regions_skipped"] == n_ref - len(reads)
  assert 0 < stats["windows_skipped"] < stats["windows"]
  empty = tissue.TissueMask(mask=np.zeros((15, 20), bool), downsample=(10.0, 10.0), threshold=0.1,
                            otsu=float("nan"), fraction=0.0)
  reads.clear()
  none = regions.predict_mask(pointwise, read, h, w, tissue=tissue.WindowFilter(empty, h, w), **kw)
  assert not none.any() and reads == []


@pytest.mark.skipif(not GLAS.is_dir(), reason="GlaS not found at ../shared/data/glas")
def test_glas_fields_on_glass_keep_their_glands():
  """Real GlaS fields pasted on glass, with predict's margin (one 224 window at scale 1): the glands
  lie in the kept windows, the glass around the field does not. The five fields are the ones whose
  glands a 26-px margin covered worst (of all 165); testA_1, the palest, has glands cut open by the
  field's edge whose lumens reach the glass (no real slide's tissue ends there)."""
  from PIL import Image

  margin = regions.region_margin(224, (1.0, 1.25, 1.5))
  floors = {"testA_1": 0.97, "testA_15": 0.999, "train_26": 0.999, "testA_17": 0.999,
            "train_24": 0.999}
  rng = np.random.default_rng(0)
  for name, floor in floors.items():
    img = np.asarray(Image.open(GLAS / f"{name}.png").convert("RGB"))
    glands = np.asarray(Image.open(GLAS / f"{name}_anno.png")) > 0
    h, w = img.shape[:2]
    canvas = np.clip(np.full((h + 600, w + 800, 3), GLASS) + rng.integers(-3, 4, (h + 600, w + 800, 3)),
                     0, 255).astype(np.uint8)
    canvas[300:300 + h, 400:400 + w] = img
    f = tissue.thumbnail_factor(0.62)  # 13: 8.06 µm/px
    thumb = tissue.read_thumbnail(lambda y0, y1, x0, x1: canvas[y0:y1, x0:x1], *canvas.shape[:2], f)
    t = tissue.tissue_mask(thumb, downsample=(f, f), mpp=0.62)
    flt = tissue.WindowFilter(t, *canvas.shape[:2], margin=margin)
    ys, xs = np.nonzero(glands)
    step = max(1, len(ys) // 3000)
    kept = np.mean([flt.any_tissue(300 + y, 301 + y, 400 + x, 401 + x)
                    for y, x in zip(ys[::step], xs[::step])])
    assert kept >= floor, (name, kept)
    # A window on the glass well away from the field is skipped.
    assert not flt.any_tissue(0, 40, 0, canvas.shape[1]), name
    assert 0.05 < t.fraction < 0.4, (name, t.fraction)  # the field is 23 % of the canvas
