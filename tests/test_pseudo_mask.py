"""Tests for oeem_jax.method.pseudo_mask with analytic fake CAM functions and a slow NumPy reference (docs/reference.md §3)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from oeem_jax.method import pseudo_mask as pm

TILE = 112
# Linear fake CAM: 8x8 average pooling of the normalised input (224 -> 28), then a 3 -> 2 map + bias.
A = np.array([[1.0, -0.5], [-0.3, 1.2], [0.2, 0.4]], np.float32)
BIAS = np.array([0.05, -0.05], np.float32)


def _normalize(x):
  return (x / 255.0 - 0.5) / 0.25


def _linear_cam(x):
  b = x.shape[0]
  pooled = x.reshape(b, 28, 8, 28, 8, 3).mean(axis=(2, 4))
  return pooled @ A + BIAS


def _linear_cam_params(params, x):
  """Like _linear_cam for any input side divisible by 8 (output side / 8), with (A, bias) as params."""
  a, bias = params
  b, side = x.shape[0], x.shape[1] // 8
  return x.reshape(b, side, 8, side, 8, 3).mean(axis=(2, 4)) @ a + bias


def _tiles(t=3, seed=0):
  """Structured RGB tiles: smooth ramps and blobs plus noise, so the class maps cross inside a tile."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:TILE, :TILE].astype(np.float64)
  out = []
  for i in range(t):
    r = 128 + 100 * np.sin(xx / (9 + i) + i) * np.cos(yy / 13)
    g = 128 + 90 * np.cos((xx + 2 * yy) / (17 + 3 * i))
    b = 60 + 1.2 * xx + rng.normal(0, 20, (TILE, TILE))
    out.append(np.stack([r, g, b], -1))
  return np.clip(np.round(np.stack(out)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Slow NumPy reference: interpolation matrices built by loops, explicit loops over tiles/scales.
# ----------------------------------------------------------------------------------------------
def _kernel(method, d):
  d = abs(d)
  if method == "linear":
    return max(0.0, 1.0 - d)
  a = -0.5  # Keys cubic, as PIL's BICUBIC
  if d <= 1:
    return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
  if d < 2:
    return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
  return 0.0


@functools.lru_cache(maxsize=None)
def _matrix(n_in, n_out, method):
  """Half-pixel-centre resampling matrix [n_out, n_in], out-of-image taps dropped and renormalised."""
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    centre = (i + 0.5) * n_in / n_out - 0.5
    for j in range(n_in):
      m[i, j] = _kernel(method, j - centre)
    m[i] /= m[i].sum()
  return m


def _np_resize(img, size, method, emulate_pil):
  """img [H, W, C] float64 -> [size, size, C]; PIL-like: W pass, round half up + clip, H pass, round + clip.

  Ties: values within 1e-3 below a half level round up (as the module documents).
  """
  mw = _matrix(img.shape[1], size, method)
  mh = _matrix(img.shape[0], size, method)
  q = (lambda v: np.clip(np.floor(v + 0.5 + 1e-3), 0, 255)) if emulate_pil else (lambda v: v)
  tmp = q(np.einsum("ow,hwc->hoc", mw, img, optimize=True))
  return q(np.einsum("oh,hwc->owc", mh, tmp, optimize=True))


def _np_multiscale_cam(tiles, cam_fn, scales, emulate_pil):
  out = []
  for tile in tiles.astype(np.float64):
    total = np.zeros((TILE, TILE, 2))
    for s in scales:
      size = int(TILE * s)
      canvas = tile if size == TILE else _np_resize(tile, size, "cubic", emulate_pil)
      offs = [0] + [o for o in range(56, size - TILE + 1, 56)]
      if offs[-1] != size - TILE:
        offs.append(size - TILE)
      acc = np.zeros((size, size, 2))
      cnt = np.zeros((size, size, 1))
      for y in offs:
        for x in offs:
          sub = _np_resize(canvas[y:y + TILE, x:x + TILE], 224, "linear", emulate_pil)
          cam = np.asarray(cam_fn(_normalize(sub)[None].astype(np.float32)), np.float64)[0]
          up = np.einsum("oh,hwc->owc", _matrix(28, TILE, "linear"),
                         np.einsum("ow,hwc->hoc", _matrix(28, TILE, "linear"), cam))
          acc[y:y + TILE, x:x + TILE] += up
          cnt[y:y + TILE, x:x + TILE] += 1
      canvas_cam = acc / cnt
      if size != TILE:
        canvas_cam = np.einsum("oh,hwc->owc", _matrix(size, TILE, "linear"),
                               np.einsum("ow,hwc->hoc", _matrix(size, TILE, "linear"), canvas_cam))
      total += canvas_cam
    out.append(total)
  return np.stack(out)


# ----------------------------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------------------------
def test_scale_plan_gives_1_4_4_9_9_subtiles():
  assert [pm.canvas_size(s) for s in pm.DEFAULT_SCALES] == [112, 140, 168, 196, 224]
  counts = [len(pm.subtile_offsets(s)) for s in pm.DEFAULT_SCALES]
  assert counts == [1, 4, 4, 9, 9] and sum(counts) == 27
  assert pm.subtile_offsets(1.25) == [(0, 0), (0, 28), (28, 0), (28, 28)]
  assert pm.subtile_offsets(1.75)[-1] == (84, 84)
  assert pm.subtile_offsets(2.0)[:3] == [(0, 0), (0, 56), (0, 112)]
  with pytest.raises(ValueError, match=">= 1"):
    pm.subtile_offsets(0.75)


def test_constant_cam_shapes_batch_and_label_suppression():
  seen = []

  def const_cam(x):
    seen.append(x.shape)
    return jnp.broadcast_to(jnp.array([2.0, 1.0], jnp.float32), (x.shape[0], 28, 28, 2))

  tiles = _tiles(3)
  cam = jax.jit(lambda t: pm.multiscale_cam(t, const_cam, normalize=_normalize))(tiles)
  assert seen == [(3 * 27, 224, 224, 3)]            # one call with all 27 sub-tiles of each tile
  assert cam.shape == (3, TILE, TILE, 2) and cam.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(cam), np.broadcast_to([10.0, 5.0], cam.shape), rtol=1e-6)  # 5 scales
  labels = np.array([[1, 1], [0, 1], [1, 0]], np.uint8)
  masks = np.asarray(pm.label_masked_argmax(cam, labels))
  assert masks.dtype == np.uint8 and masks.shape == (3, TILE, TILE)
  assert (masks[0] == 0).all()   # class 0 scores higher
  assert (masks[1] == 1).all()   # gland-only label: all gland although class 0 scores higher
  assert (masks[2] == 0).all()
  # Fewer scales: fewer sub-tiles.
  seen.clear()
  cam2 = jax.eval_shape(lambda t: pm.multiscale_cam(t, const_cam, scales=(1.0, 1.5), normalize=_normalize), tiles)
  assert seen == [(3 * 5, 224, 224, 3)] and cam2.shape == (3, TILE, TILE, 2)


@pytest.mark.parametrize("emulate_pil", [True, False])
def test_matches_slow_numpy_reference_for_linear_cam(emulate_pil):
  tiles = _tiles(1, seed=1)
  fn = jax.jit(lambda t: pm.multiscale_cam(t, _linear_cam, normalize=_normalize, emulate_pil=emulate_pil))
  got = np.asarray(fn(tiles))
  want = _np_multiscale_cam(tiles, _linear_cam, pm.DEFAULT_SCALES, emulate_pil)
  # With emulate_pil a value within float32 error of a rounding boundary can still land one uint8 level
  # apart (~3e-4 in the summed CAM); the float path agrees to float32 precision.
  np.testing.assert_allclose(got, want, atol=1e-3 if emulate_pil else 2e-5, rtol=0)
  assert np.abs(want).max() > 0.5
  labels = np.ones((1, 2), np.uint8)
  masks = np.asarray(pm.label_masked_argmax(jnp.asarray(got), labels))
  margin = np.abs(want[..., 0] - want[..., 1])
  decided = margin > 1e-2
  np.testing.assert_array_equal(masks[decided], np.argmax(want, -1)[decided])
  assert decided.mean() > 0.95
  # Both classes occur, so the suppression test below is meaningful.
  assert 0.05 < masks.mean() < 0.95


@functools.lru_cache(maxsize=None)
def _two_scale_masks_fn():
  return jax.jit(lambda t, l: pm.pseudo_masks(t, l, _linear_cam, scales=(1.0, 1.25), normalize=_normalize))


def test_label_suppression_on_mixed_cam():
  tiles = np.repeat(_tiles(1, seed=2), 5, axis=0)
  labels = np.array([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1]], np.uint8)
  masks = np.asarray(_two_scale_masks_fn()(tiles, labels))
  assert 0 < masks[0].sum() < masks[0].size      # unsuppressed: both classes
  assert (masks[1] == 1).all()                    # tile labelled only gland -> all gland
  assert (masks[2] == 0).all()                    # tile labelled only non-gland -> all non-gland
  assert (masks[3] == 0).all()                    # no class present: documented fallback to 0


def test_pil_like_resize_matches_pil():
  tile = _tiles(1, seed=3)[0]
  sizes = (140, 168, 196, 224)
  bil, *cubic = jax.jit(lambda x: [pm.resize_image(x, 224, "linear")] +
                        [pm.resize_image(x, size, "cubic") for size in sizes])(tile[None].astype(np.float32))
  np.testing.assert_array_equal(np.asarray(bil)[0], np.asarray(Image.fromarray(tile).resize((224, 224), Image.BILINEAR)))
  for size, ours in zip(sizes, cubic):
    ours = np.asarray(ours)[0]
    pil = np.asarray(Image.fromarray(tile).resize((size, size), Image.BICUBIC)).astype(np.float32)
    diff = np.abs(ours - pil)
    assert diff.max() <= 2 and (diff > 0).mean() < 0.03, (size, diff.max(), (diff > 0).mean())


def test_tile_pseudo_masks_pads_last_batch_and_compiles_once():
  tiles = _tiles(5, seed=4)
  labels = np.array([[1, 1], [0, 1], [1, 1], [1, 0], [1, 1]], np.uint8)
  traces = []

  def cam_fn(params, x):
    traces.append(x.shape)
    return _linear_cam_params(params, x)

  params = (jnp.asarray(A), jnp.asarray(BIAS))
  kw = dict(cam_params=params, batch_size=2, scales=(1.0, 1.25), normalize=_normalize, cam_input=112)
  got, unmasked = pm.tile_pseudo_masks(tiles, labels, cam_fn, return_unmasked=True, **kw)
  assert traces == [(2 * 5, 112, 112, 3)]        # 3 batches (last padded), one trace, cam_input 112
  assert got.shape == unmasked.shape == (5, TILE, TILE) and got.dtype == unmasked.dtype == np.uint8
  want = jax.jit(lambda t, l: pm.pseudo_masks(t, l, functools.partial(_linear_cam_params, params), scales=(1.0, 1.25),
                                              normalize=_normalize, cam_input=112))(tiles, labels)
  np.testing.assert_array_equal(got, np.asarray(want))
  # Unmasked = the masks with every class allowed; it differs from the suppressed masks.
  all_on = pm.tile_pseudo_masks(tiles, np.ones_like(labels), cam_fn, **kw)
  assert len(traces) == 1                        # same cam_fn and shapes: the cached step is reused
  np.testing.assert_array_equal(unmasked, all_on)
  np.testing.assert_array_equal(got[[0, 2, 4]], unmasked[[0, 2, 4]])
  assert (got[1] == 1).all() and (got[3] == 0).all() and 0 < unmasked[1].mean() < 1
  with pytest.raises(ValueError, match="labels must be"):
    pm.tile_pseudo_masks(tiles, labels[:3], cam_fn, cam_params=params)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match=r"tiles must be \[T, 112, 112, 3\]"):
    pm.multiscale_cam(np.zeros((1, 64, 64, 3), np.uint8), _linear_cam, normalize=_normalize)
  with pytest.raises(ValueError, match="cam_fn must return"):
    jax.eval_shape(lambda t: pm.multiscale_cam(t, lambda x: x[:1, :28, :28, :2], scales=(1.25,),
                                               normalize=_normalize), np.zeros((1, TILE, TILE, 3), np.uint8))
  with pytest.raises(ValueError, match="labels must be"):
    pm.label_masked_argmax(jnp.zeros((2, 4, 4, 2)), jnp.ones((2, 3)))


def _np_label_masked_softmax(cam, labels, temperature):
  """Slow reference: per tile, softmax over the present classes only (class 0 if none)."""
  out = np.zeros_like(cam, np.float64)
  for t in range(cam.shape[0]):
    present = [c for c in range(cam.shape[-1]) if labels[t, c] > 0] or [0]
    z = cam[t][..., present].astype(np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    out[t][..., present] = z / z.sum(axis=-1, keepdims=True)
  return out


def test_label_masked_softmax_matches_numpy_and_shares_the_argmax():
  rng = np.random.default_rng(5)
  cam = rng.normal(0, 20, (5, 7, 7, 2)).astype(np.float32)
  labels = np.array([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1]], np.uint8)
  for temperature in (1.0, 48.0):
    got = np.asarray(pm.label_masked_softmax(jnp.asarray(cam), jnp.asarray(labels), temperature))
    np.testing.assert_allclose(got, _np_label_masked_softmax(cam, labels, temperature), atol=1e-6)
    np.testing.assert_array_equal(got.argmax(-1), np.asarray(pm.label_masked_argmax(jnp.asarray(cam), labels)))
  # Two classes: gland probability = sigmoid((cam_1 - cam_0) / T), worked by hand for one pixel.
  one = np.array([[[[1.0, 25.0]]]], np.float32)
  p = np.asarray(pm.label_masked_softmax(jnp.asarray(one), np.array([[1, 1]]), 48.0))[0, 0, 0]
  np.testing.assert_allclose(p, [1 / (1 + np.exp(0.5)), 1 / (1 + np.exp(-0.5))], rtol=1e-6)
  assert (got[1, ..., 1] == 1).all() and (got[2, ..., 0] == 1).all() and (got[3, ..., 0] == 1).all()
  unmasked = np.asarray(pm.label_masked_softmax(jnp.asarray(cam), None, 48.0))
  np.testing.assert_allclose(unmasked, _np_label_masked_softmax(cam, np.ones_like(labels), 48.0), atol=1e-6)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    pm.label_masked_softmax(jnp.asarray(cam), labels, 0.0)


def test_tile_pseudo_masks_with_temperature_returns_probabilities_of_the_same_masks():
  tiles = _tiles(3, seed=6)
  labels = np.array([[1, 1], [0, 1], [1, 1]], np.uint8)
  params = (jnp.asarray(A), jnp.asarray(BIAS))
  kw = dict(cam_params=params, batch_size=2, scales=(1.0,), normalize=_normalize, cam_input=112,
            return_unmasked=True)
  hard, hard_un = pm.tile_pseudo_masks(tiles, labels, _linear_cam_params, **kw)
  soft, soft_un = pm.tile_pseudo_masks(tiles, labels, _linear_cam_params, temperature=0.1, **kw)
  assert soft.shape == soft_un.shape == (3, TILE, TILE, 2) and soft.dtype == np.float32
  np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(soft.argmax(-1), hard)
  np.testing.assert_array_equal(soft_un.argmax(-1), hard_un)
  assert (soft[1, ..., 1] == 1).all() and 0 < soft_un[1, ..., 1].min() < 1
  with pytest.raises(ValueError, match="temperature must be > 0 or None"):
    pm.tile_pseudo_masks(tiles, labels, _linear_cam_params, cam_params=params, temperature=-1.0)
