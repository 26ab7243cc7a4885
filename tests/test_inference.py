"""Tests for oeem_jax.evaluation.inference: window grid, stitching, flips, scales and the single compile."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import softmax

from oeem_jax.evaluation import inference

# A fixed 1x1 convolution (per-pixel linear map 3 -> 2 channels): translation equivariant with
# no border effect, so windows stitch exactly into whole-image inference.
W1 = np.array([[0.5, -1.0], [0.25, 2.0], [-0.75, 0.5]], np.float32)
B1 = np.array([0.1, -0.2], np.float32)


def pointwise(x):
  return jnp.einsum("bhwc,cd->bhwd", x, W1) + B1


def conv3x3(x):
  k = jnp.asarray(np.linspace(-1, 1, 3 * 3 * 3 * 2, dtype=np.float32).reshape(3, 3, 3, 2))
  return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def whole(fn, image):
  return np.asarray(fn(jnp.asarray(image[None])))[0]


@pytest.mark.parametrize("length, expected", [
    (775, [0, 256, 455]),  # (775-320+255)//256+1 = 3; last one flush: 775-320 = 455
    (522, [0, 202]),       # (522-320+255)//256+1 = 2; 522-320 = 202
    (320, [0]),
    (100, [0]),            # shorter than the window: one (padded) window
    (576, [0, 256]),       # 576-320 = 256 is a multiple of the stride: exact fit
    (577, [0, 256, 257]),  # one pixel more: a third window, flush with the border
    (1, [0]),
])
def test_window_starts(length, expected):
  starts = inference.window_starts(length)
  assert starts == expected
  assert starts[-1] + 320 == max(length, 320)


def test_window_starts_other_sizes_and_errors():
  assert inference.window_starts(10, window=6, stride=4) == [0, 4]
  assert inference.window_starts(13, window=6, stride=4) == [0, 4, 7]
  with pytest.raises(ValueError):
    inference.window_starts(0)


def test_scaled_size_rounds_half_up():
  assert inference.scaled_size(522, 775, 0.75) == (392, 581)  # 391.5 -> 392, 581.25 -> 581
  assert inference.scaled_size(522, 775, 2.5) == (1305, 1938)
  assert inference.scaled_size(2, 3, 0.1) == (1, 1)


def test_resize_bilinear_half_pixel_no_antialias():
  x = np.array([[0.0, 1.0]], np.float32)[..., None]
  np.testing.assert_allclose(inference.resize_bilinear_host(x, (1, 4))[0, :, 0], [0, 0.25, 0.75, 1])
  # Downsampling by 2 averages pixel pairs (half-pixel centres), no wider antialias kernel.
  y = np.arange(8, dtype=np.float32)[None, :, None]
  np.testing.assert_allclose(inference.resize_bilinear_host(y, (1, 4))[0, :, 0], [0.5, 2.5, 4.5, 6.5])


def test_overlaps_are_averaged_hand_worked():
  # apply_fn returns the window-local row index. Rows of a 10-high image, windows at 0 and 4
  # (window 6, stride 4): rows 0-3 -> 0,1,2,3; rows 4-5 are in both windows: (4+0)/2, (5+1)/2;
  # rows 6-9 -> local 2..5.
  def local_row(x):
    b, h, w, _ = x.shape
    return jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32)[None, :, None, None], (b, h, w, 1))

  out = inference.sliding_window_logits(local_row, np.zeros((10, 3, 3), np.float32), window=6,
                                        stride=4, batch_size=3)
  assert out.shape == (10, 3, 1) and out.dtype == np.float32
  np.testing.assert_allclose(out[:, 0, 0], [0, 1, 2, 3, 2, 3, 2, 3, 4, 5])


def test_sliding_matches_slow_numpy_reference():
  # Position- and content-dependent apply_fn; reference loops over the windows one by one.
  def fn(x):
    b, h, w, _ = x.shape
    pos = jnp.arange(h * w, dtype=jnp.float32).reshape(1, h, w, 1) / 100.0
    return jnp.concatenate([x.sum(-1, keepdims=True) + pos, jnp.broadcast_to(pos, (b, h, w, 1))], -1)

  rng = np.random.default_rng(0)
  img = rng.normal(size=(37, 29, 3)).astype(np.float32)
  window, stride = 16, 12
  got = inference.sliding_window_logits(fn, img, window=window, stride=stride, batch_size=4)
  acc = np.zeros((37, 29, 2))
  cnt = np.zeros((37, 29, 1))
  for y in inference.window_starts(37, window, stride):
    for x in inference.window_starts(29, window, stride):
      acc[y:y + window, x:x + window] += whole(fn, img[y:y + window, x:x + window])
      cnt[y:y + window, x:x + window] += 1
  np.testing.assert_allclose(got, acc / cnt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64, 3), (40, 23, 3), (130, 90, 3)])
def test_pointwise_stitching_equals_whole_image(shape):
  img = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  got = inference.sliding_window_logits(pointwise, img, window=64, stride=48, batch_size=2)
  np.testing.assert_allclose(got, whole(pointwise, img), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64, 3), (50, 37, 3)])
def test_one_window_equals_whole_image_conv(shape):
  # One window covers the image: a 3x3 conv gives exactly the whole-image result, also when the
  # image is smaller than the window (zero padding = the conv's own SAME zero padding).
  img = np.random.default_rng(2).normal(size=shape).astype(np.float32)
  got = inference.sliding_window_logits(conv3x3, img, window=64, stride=48, batch_size=3)
  np.testing.assert_allclose(got, whole(conv3x3, img), rtol=1e-5, atol=1e-5)


def _identity_norm(x):
  return x / 255.0


def test_flip_is_undone():
  img = np.random.default_rng(3).integers(0, 256, (30, 41, 3), dtype=np.uint8)
  kw = dict(normalize=_identity_norm, scales=(1.0,), window=32, stride=24, batch_size=4)
  # Per-pixel model: the flipped pass, flipped back, equals the unflipped pass.
  with_flip = inference.predict_probs(pointwise, img, flip=True, **kw)
  without = inference.predict_probs(pointwise, img, flip=False, **kw)
  np.testing.assert_allclose(with_flip, without, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(without, softmax(whole(pointwise, img / 255.0), -1), rtol=1e-5, atol=1e-6)

  # Model whose logit grows with the window-local column: flip and unflip give the mirror image,
  # so the average at column x is mean(softmax([0, k·x]), softmax([0, k·(W-1-x)])).
  k = 0.3

  def local_col(x):
    b, h, w, _ = x.shape
    col = jnp.arange(w, dtype=jnp.float32)[None, None, :, None] * k
    return jnp.concatenate([jnp.zeros((b, h, w, 1)), jnp.broadcast_to(col, (b, h, w, 1))], -1)

  small = img[:, :20]  # narrower than the window: one window per row of windows
  probs = inference.predict_probs(local_col, small, flip=True, normalize=_identity_norm,
                                  scales=(1.0,), window=32, stride=24, batch_size=4)
  cols = np.arange(20)
  p = lambda z: 1 / (1 + np.exp(-z))
  np.testing.assert_allclose(probs[0, :, 1], (p(k * cols) + p(k * (19 - cols))) / 2, rtol=1e-5)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_scales_are_averaged():
  img = np.random.default_rng(4).integers(0, 256, (24, 33, 3), dtype=np.uint8)
  scales = (0.5, 1.0, 1.5)
  got = inference.predict_probs(pointwise, img, normalize=_identity_norm, scales=scales, flip=False,
                                window=32, stride=24, batch_size=5)
  # Reference: per scale, resize (rounded to uint8 levels), per-pixel model, resize back, softmax.
  ref = np.zeros((24, 33, 2))
  for s in scales:
    size = inference.scaled_size(24, 33, s)
    scaled = np.clip(np.rint(inference.resize_bilinear_host(img.astype(np.float32), size)), 0, 255)
    logits = whole(pointwise, scaled / 255.0)
    ref += softmax(inference.resize_bilinear_host(logits, (24, 33)), -1) / len(scales)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # A constant image gives the same probabilities at every scale.
  const = np.full((24, 33, 3), 100, np.uint8)
  got = inference.predict_probs(pointwise, const, normalize=_identity_norm, scales=scales,
                                window=32, stride=24, batch_size=5)
  expected = softmax(np.full(3, 100 / 255.0, np.float32) @ W1 + B1)
  np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), rtol=1e-5)


def test_compiles_once_for_all_sizes_scales_and_images():
  traces = []

  def counted(x):
    traces.append(x.shape)
    return pointwise(x)

  apply_fn = jax.jit(counted)
  rng = np.random.default_rng(5)
  for shape in [(40, 50), (64, 64), (100, 30), (131, 77), (7, 9)]:
    img = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    probs = inference.predict_probs(apply_fn, img, normalize=_identity_norm,
                                    scales=(0.75, 1.0, 1.5), flip=True, window=32, stride=24,
                                    batch_size=4)
    assert probs.shape == shape + (2,)
    logits = inference.sliding_window_logits(apply_fn, img / 255.0, window=32, stride=24,
                                             batch_size=4)
    assert logits.shape == shape + (2,)
  assert traces == [(4, 32, 32, 3)]


def test_bad_inputs():
  with pytest.raises(ValueError, match="uint8"):
    inference.predict_probs(pointwise, np.zeros((8, 8, 3), np.float32), normalize=_identity_norm)
  with pytest.raises(ValueError, match="apply_fn must map"):
    inference.sliding_window_logits(lambda x: x[:, ::2], np.zeros((8, 8, 3), np.float32),
                                    window=8, stride=8, batch_size=1)
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    inference.sliding_window_logits(pointwise, np.zeros((8, 8), np.float32))


def test_remove_small_regions_hand_worked():
  m = np.zeros((8, 8), np.uint8)
  m[0, 0] = 1                 # a 1-pixel speck: removed at min_object_area 2
  m[0, 7] = m[1, 7] = 1       # a 2-pixel object: kept (not fewer than 2)
  m[3:7, 3:7] = 1
  m[4, 4] = 0                 # a 1-pixel hole: filled at max_hole_area 2
  m[5, 5] = 0                 # a second 1-pixel hole (8-connected to the first only diagonally)
  out = inference.remove_small_regions(m, min_object_area=2, max_hole_area=2)
  want = np.zeros((8, 8), np.uint8)
  want[0, 7] = want[1, 7] = 1
  want[3:7, 3:7] = 1
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, want)
  # A 2-pixel hole survives max_hole_area 2 and is filled at 3; objects are 8-connected.
  h = np.ones((5, 6), np.uint8)
  h[2, 2] = h[2, 3] = 0
  np.testing.assert_array_equal(inference.remove_small_regions(h, max_hole_area=2), h)
  np.testing.assert_array_equal(inference.remove_small_regions(h, max_hole_area=3), np.ones_like(h))
  diag = np.eye(3, dtype=bool)  # one 3-pixel object under 8-connectivity
  np.testing.assert_array_equal(inference.remove_small_regions(diag, min_object_area=3), diag)
  np.testing.assert_array_equal(inference.remove_small_regions(diag, min_object_area=4), 0 * diag)
  # Zero areas change nothing; bad input is named.
  np.testing.assert_array_equal(inference.remove_small_regions(m), m)
  with pytest.raises(ValueError, match="2-D"):
    inference.remove_small_regions(np.zeros((2, 2, 1)))
  with pytest.raises(ValueError, match=">= 0"):
    inference.remove_small_regions(m, min_object_area=-1)
