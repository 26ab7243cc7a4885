"""Tests for oeem_jax.method.losses against slow plain-NumPy loop references (paper Eq. 3-8, docs/reference.md §5)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oeem_jax.method import losses

IGN = 255
ALL_KINDS = losses.KINDS


# ----------------------------------------------------------------------------------------------
# Slow NumPy references: explicit loops over images and pixels, float64.
# ----------------------------------------------------------------------------------------------
def _np_softmax_ce(logits, labels, ignore=IGN):
  n, h, w, c = logits.shape
  probs = np.zeros((n, h, w, c))
  ce = np.zeros((n, h, w))
  valid = np.zeros((n, h, w), bool)
  for b in range(n):
    for i in range(h):
      for j in range(w):
        z = logits[b, i, j].astype(np.float64)
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        for k in range(c):
          probs[b, i, j, k] = math.exp(z[k] - lse)
        y = int(labels[b, i, j])
        if y != ignore:
          valid[b, i, j] = True
          ce[b, i, j] = lse - z[y]
  return probs, ce, valid


def _np_weights(logits, labels, kind, *, compat=False, single_class_ce=True, thresh=0.7, min_kept=5,
                scope=None, ignore=IGN):
  """Returns (W, CE, denominator) computed pixel by pixel."""
  probs, ce, valid = _np_softmax_ce(logits, labels, ignore)
  n, h, w, c = logits.shape
  weights = np.zeros((n, h, w))
  if kind == "ohem":
    scope = scope or ("batch" if compat else "image")
    groups = [[b] for b in range(n)] if scope == "image" else [list(range(n))]
    k = min_kept if scope == "image" else min_kept * n
    for group in groups:
      ps = []
      for b in group:
        for i in range(h):
          for j in range(w):
            if valid[b, i, j]:
              ps.append(probs[b, i, j, labels[b, i, j]])
      ps_sorted = sorted(ps)
      kth = ps_sorted[min(k, len(ps) - 1)] if ps else 0.0
      t = max(kth, thresh)
      for b in group:
        for i in range(h):
          for j in range(w):
            if valid[b, i, j] and probs[b, i, j, labels[b, i, j]] < t:
              weights[b, i, j] = 1.0
  else:
    for b in range(n):
      pix = [(i, j) for i in range(h) for j in range(w) if compat or valid[b, i, j]]
      classes = {int(labels[b, i, j]) for i in range(h) for j in range(w) if valid[b, i, j]}
      # Eq. 6: softmax over the image's pixels of -L, divided by its mean.
      if pix:
        lmin = min(ce[b][p] for p in pix)  # softmax is shift-invariant; shift to avoid 0/0
        ex = {p: math.exp(-(ce[b][p] - lmin)) for p in pix}
        tot = sum(ex.values())
        sm = {p: ex[p] / tot for p in pix}
        mean_sm = sum(sm.values()) / len(pix)
      for p in pix:
        pr = probs[b][p]
        if kind == "ce":
          wv = 1.0
        elif kind == "oeem":
          wv = sm[p] / mean_sm
        elif kind == "c_max":
          wv = max(pr)
        elif kind == "c_diff":
          wv = max(pr) - min(pr)
        elif kind == "lc_mix":
          wv = sm[p] / mean_sm * max(pr)
        else:
          raise ValueError(kind)
        if kind != "ce" and single_class_ce and len(classes) <= 1:
          wv = 1.0
        weights[b][p] = wv
  denom = n * h * w if compat else max(int(valid.sum()), 1)
  return weights, ce, denom


def _np_loss(logits, labels, kind, **kw):
  weights, ce, denom = _np_weights(logits, labels, kind, **kw)
  total = 0.0
  for idx in np.ndindex(*ce.shape):
    total += weights[idx] * ce[idx]
  return total / denom


def _batch(c, seed=0, h=5, w=6):
  """Image 0: mixed with ignore pixels; 1: single class + ignore; 2: all ignored; 3: mixed, no ignore."""
  rng = np.random.default_rng(seed)
  logits = (3.0 * rng.standard_normal((4, h, w, c))).astype(np.float32)
  labels = rng.integers(0, c, size=(4, h, w)).astype(np.int32)
  labels[0][rng.random((h, w)) < 0.3] = IGN
  labels[1] = 1
  labels[1, :2, :] = IGN
  labels[2] = IGN
  return logits, labels


# ----------------------------------------------------------------------------------------------
# Values against the loop references. Every kind and both conventions are evaluated in ONE jitted
# call per class count (compiling each combination separately would dominate the test time).
# ----------------------------------------------------------------------------------------------
def _mode(compat):
  return "compat" if compat else "default"


@functools.lru_cache(maxsize=None)
def _all_kinds_on_batch(c):
  logits, labels = _batch(c, seed=c)

  def run(z, y):
    out = {}
    for kind in ALL_KINDS:
      for compat in (False, True):
        kw = dict(reference_compat=compat, min_kept=5)
        out[kind, _mode(compat)] = (losses.loss_weights(z, y, kind, **kw),
                                    losses.segmentation_loss(z, y, kind=kind, **kw))
      # Independence: each image on its own (a batch of one, mapped over the images), and the batch
      # with image 3's logits changed.
      alone = jax.vmap(lambda zi, yi: losses.loss_weights(zi[None], yi[None], kind, min_kept=5)[0])(z, y)
      perturbed = losses.loss_weights(z.at[3].multiply(-5.0), y, kind, min_kept=5)
      out[kind, "independence"] = (alone, perturbed)
    return out

  return logits, labels, jax.device_get(jax.jit(run)(logits, labels))


@pytest.mark.parametrize("c", [2, 3])
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("compat", [False, True])
def test_every_kind_matches_numpy_loops(kind, c, compat):
  logits, labels, results = _all_kinds_on_batch(c)
  got_w, got = results[kind, _mode(compat)]
  want_w, _, _ = _np_weights(logits, labels, kind, compat=compat, min_kept=5)
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-5)
  assert got.dtype == np.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), _np_loss(logits, labels, kind, compat=compat, min_kept=5),
                             rtol=1e-5, atol=1e-6)
  if kind == "ohem":
    assert 0 < got_w.sum() < (labels != IGN).sum()


@pytest.mark.parametrize("c", [2, 3])
@pytest.mark.parametrize("scope", ["image", "batch"])
def test_ohem_thresholds_and_min_kept_match_numpy_loops(c, scope):
  logits, labels = _batch(c, seed=10 + c)
  for thresh, min_kept in [(0.7, 5), (0.0, 7), (0.99, 3), (0.5, 100)]:
    kw = dict(thresh=thresh, min_kept=min_kept, ohem_scope=scope)
    want_w, _, _ = _np_weights(logits, labels, "ohem", thresh=thresh, min_kept=min_kept, scope=scope)
    got_w = np.asarray(losses.loss_weights(logits, labels, "ohem", **kw))
    np.testing.assert_array_equal(got_w, want_w, err_msg=f"thresh={thresh} min_kept={min_kept}")
    assert got_w.sum() > 0
    want = _np_loss(logits, labels, "ohem", thresh=thresh, min_kept=min_kept, scope=scope)
    np.testing.assert_allclose(float(losses.segmentation_loss(logits, labels, kind="ohem", **kw)), want,
                               rtol=1e-5, atol=1e-6)


def test_ohem_threshold_and_min_kept_by_hand():
  # One image, 1x4 pixels of class 0 with true-class probabilities 0.1, 0.6, 0.8, 0.95.
  p = np.array([0.1, 0.6, 0.8, 0.95])
  logits = np.stack([np.log(p), np.log(1 - p)], -1).reshape(1, 1, 4, 2).astype(np.float32)
  labels = np.zeros((1, 1, 4), np.int32)
  kept = lambda **kw: np.asarray(losses.loss_weights(logits, labels, "ohem", **kw))[0, 0].tolist()
  assert kept(thresh=0.7, min_kept=1) == [1, 1, 0, 0]   # threshold 0.7 wins over sorted[1] = 0.6
  assert kept(thresh=0.7, min_kept=2) == [1, 1, 0, 0]   # sorted[2] = 0.8 -> p < 0.8
  assert kept(thresh=0.7, min_kept=3) == [1, 1, 1, 0]   # sorted[3] = 0.95
  assert kept(thresh=0.7, min_kept=50) == [1, 1, 1, 0]  # mmseg quirk: index clipped to n-1, max dropped
  assert kept(thresh=0.0, min_kept=0) == [0, 0, 0, 0]   # threshold sorted[0] = 0.1, strict <
  assert losses.default_ohem_min_kept(256, 256) == 12500
  assert losses.default_ohem_min_kept(512, 1024) == 100000


# ----------------------------------------------------------------------------------------------
# Hand-worked values and the reference's ignore convention (docs/reference.md §5).
# ----------------------------------------------------------------------------------------------
def test_oeem_hand_worked_with_padding():
  # Pixels: label 0 with L = ln 2, label 1 with L = ln 2, padding (ignored).
  logits = np.zeros((1, 1, 3, 2), np.float32)
  labels = np.array([[[0, 1, IGN]]], np.int32)
  ln2 = math.log(2.0)
  # Default: W = [1, 1, 0], loss = (ln2 + ln2) / 2 valid pixels.
  np.testing.assert_allclose(np.asarray(losses.loss_weights(logits, labels, "oeem"))[0, 0], [1, 1, 0], atol=1e-6)
  np.testing.assert_allclose(float(losses.segmentation_loss(logits, labels)), ln2, rtol=1e-6)
  # Reference: exp(-L) = [.5, .5, 1], mean 2/3 -> W = [.75, .75, 1.5]; loss = 1.5 ln2 / 3 pixels.
  np.testing.assert_allclose(np.asarray(losses.loss_weights(logits, labels, "oeem", reference_compat=True))[0, 0],
                             [0.75, 0.75, 1.5], rtol=1e-6)
  np.testing.assert_allclose(float(losses.segmentation_loss(logits, labels, reference_compat=True)), 0.5 * ln2,
                             rtol=1e-6)


def _reference_oeem_vectorised(logits, labels):
  """A literal NumPy transcription of docs/reference.md §5 (whole-array ops, float64)."""
  z = np.moveaxis(logits.astype(np.float64), -1, 1)                       # N, C, H, W
  z = z - z.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  safe = np.where(labels == IGN, 0, labels)
  ce = -np.take_along_axis(logp, safe[:, None], 1)[:, 0]
  ce[labels == IGN] = 0.0                                                  # step 1
  n = ce.shape[0]
  flat = -ce.reshape(n, -1)
  sm = np.exp(flat - flat.max(1, keepdims=True))
  sm /= sm.sum(1, keepdims=True)
  w = (sm / sm.mean(1, keepdims=True)).reshape(ce.shape)                  # step 2, over all H*W
  for b in range(n):                                                       # step 3
    if len(set(np.unique(labels[b]).tolist()) - {IGN}) <= 1:
      w[b] = 1.0
  return float((w * ce).mean())                                            # step 4, N*H*W


def test_reference_compat_reproduces_reference_on_padded_crops():
  rng = np.random.default_rng(7)
  logits = (2.0 * rng.standard_normal((3, 8, 8, 2))).astype(np.float32)
  labels = rng.integers(0, 2, (3, 8, 8)).astype(np.int32)
  labels[0, :, 5:] = IGN      # right padding (crop smaller than 256 after a small rescale)
  labels[1, 6:, :] = IGN      # bottom padding
  labels[2, :, :] = 1
  labels[2, :, 7:] = IGN      # single class + padding: Eq. 8
  want = _reference_oeem_vectorised(logits, labels)
  got = float(losses.segmentation_loss(logits, labels, kind="oeem", reference_compat=True))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The default convention differs on this padded batch (it renormalises over valid pixels only).
  default = float(losses.segmentation_loss(logits, labels, kind="oeem"))
  assert abs(default - want) > 1e-3
  # Without padding the two conventions coincide.
  full = rng.integers(0, 2, (3, 8, 8)).astype(np.int32)
  np.testing.assert_allclose(float(losses.segmentation_loss(logits, full, reference_compat=True)),
                             float(losses.segmentation_loss(logits, full)), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Gradients: weights are constants, so d loss / d logits = W * (softmax - onehot) / D.
# ----------------------------------------------------------------------------------------------
def _gradient_cases():
  """Same-shape cases [3, 4, 5, 6, 3]: a mixed batch, the same logits x 50 all ignored, extreme logits."""
  logits, labels = _batch(3, seed=21)
  # Class logits (0, 1e3, -1e3): label 0 has L = 1e3, label 1 has L = 0, label 2 has L = 2e3, so
  # exp(-L) underflows at every valid pixel of images 0 and 1 (labels {0, 2}) unless shifted.
  extreme = np.zeros_like(logits)
  extreme[..., 1] = 1e3
  extreme[..., 2] = -1e3
  ext_labels = np.where(labels == 1, 2, labels).astype(np.int32)
  ext_labels[3, 0, 0] = 1           # one pixel with L = 0 in image 3
  return (np.stack([logits, 50 * logits, extreme]),
          np.stack([labels, np.full_like(labels, IGN), ext_labels]))


@functools.lru_cache(maxsize=None)
def _all_gradients():
  """value_and_grad of every kind and convention on every case, in one jitted call."""
  zs, ys = _gradient_cases()

  def one_case(z, y):
    return {(kind, compat): jax.value_and_grad(
        lambda q: losses.segmentation_loss(q, y, kind=kind, reference_compat=compat, min_kept=5))(z)
            for kind in ALL_KINDS for compat in (False, True)}

  return jax.device_get(jax.jit(jax.vmap(one_case))(zs, ys))


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("compat", [False, True])
def test_gradient_is_weight_times_ce_gradient(kind, compat):
  zs, ys = _gradient_cases()
  logits, labels = zs[0], ys[0]
  grad = _all_gradients()[kind, compat][1][0]
  weights, _, denom = _np_weights(logits, labels, kind, compat=compat, min_kept=5)
  probs, _, valid = _np_softmax_ce(logits, labels)
  want = np.zeros(logits.shape)
  for idx in np.ndindex(*labels.shape):
    if valid[idx]:
      onehot = np.eye(3)[labels[idx]]
      want[idx] = weights[idx] * (probs[idx] - onehot) / denom
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Invariants and edge cases.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [2, 3])
def test_oeem_weights_have_unit_mean_over_valid_pixels(c):
  logits, labels = _batch(c, seed=30)
  w = np.asarray(losses.loss_weights(logits, labels, "oeem"))
  for b in (0, 1, 3):  # image 2 has no valid pixel
    valid = labels[b] != IGN
    np.testing.assert_allclose(w[b][valid].mean(), 1.0, rtol=1e-5)
    assert np.all(w[b][~valid] == 0)
  assert np.all(w[1][labels[1] != IGN] == 1.0)   # Eq. 8: single class -> plain CE
  assert np.all(w[2] == 0)
  # Without Eq. 8 the single-class image is reweighted too, still with unit mean.
  w8 = np.asarray(losses.loss_weights(logits, labels, "oeem", single_class_ce=False))
  assert np.std(w8[1][labels[1] != IGN]) > 1e-3
  np.testing.assert_allclose(w8[1][labels[1] != IGN].mean(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("c", [2, 3])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_image_weights_do_not_depend_on_other_images(kind, c):
  _, _, results = _all_kinds_on_batch(c)
  full, _ = results[kind, "default"]
  alone, perturbed = results[kind, "independence"]
  np.testing.assert_allclose(full, alone, rtol=1e-6, atol=1e-7)
  # Changing image 3's logits leaves images 0..2 unchanged.
  np.testing.assert_allclose(perturbed[:3], full[:3], rtol=1e-6, atol=1e-7)
  assert kind == "ce" or np.abs(perturbed[3] - full[3]).max() > 1e-3


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("compat", [False, True])
def test_all_ignored_batch_is_zero_and_nan_free(kind, compat):
  loss, grad = _all_gradients()[kind, compat]
  assert loss[1] == 0.0
  assert np.all(grad[1] == 0.0)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("compat", [False, True])
def test_extreme_logits_stay_finite(kind, compat):
  zs, ys = _gradient_cases()
  loss, grad = _all_gradients()[kind, compat]
  assert np.isfinite(loss[2]) and np.all(np.isfinite(grad[2]))
  np.testing.assert_allclose(loss[2], _np_loss(zs[2], ys[2], kind, compat=compat, min_kept=5), rtol=1e-5)
  if kind == "oeem" and not compat:
    w = np.asarray(losses.loss_weights(zs[2], ys[2], "oeem"))
    # Image 0: the label-0 pixels (L = 1e3) share all the mass, the label-2 ones (L = 2e3) get 0.
    lab = ys[2][0]
    np.testing.assert_allclose(w[0][lab == 0], (lab != IGN).sum() / (lab == 0).sum(), rtol=1e-5)
    assert np.all(w[0][lab == 2] == 0) and (lab == 2).any()
    # Image 3: the one correctly classified pixel (L = 0) takes it all.
    np.testing.assert_allclose(w[3][0, 0], (ys[2][3] != IGN).sum(), rtol=1e-5)


def test_low_precision_logits_are_computed_in_float32():
  logits, labels = _batch(2, seed=50)
  bf = jnp.asarray(logits, jnp.bfloat16)
  got = losses.segmentation_loss(bf, labels)
  assert got.dtype == jnp.float32
  want = _np_loss(np.asarray(bf.astype(jnp.float32)), labels, "oeem")
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert losses.loss_weights(bf, labels, "oeem").dtype == jnp.float32


def test_works_under_jit_with_traced_labels():
  logits, labels = _batch(2, seed=60)
  f = jax.jit(lambda z, y: losses.segmentation_loss(z, y, kind="lc_mix"))
  np.testing.assert_allclose(float(f(logits, labels)), _np_loss(logits, labels, "lc_mix"), rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
  logits, labels = _batch(2)
  with pytest.raises(ValueError, match="unknown"):
    losses.segmentation_loss(logits, labels, kind="focal")
  with pytest.raises(ValueError, match="labels must be int"):
    losses.segmentation_loss(logits, labels[:, :-1])
  with pytest.raises(ValueError, match=r"logits must be float\[N, H, W, C\]"):
    losses.segmentation_loss(logits[0], labels[0])
  bad = labels.copy()
  bad[0, 0, 0] = 7
  with pytest.raises(ValueError, match=r"found \[7\]"):
    losses.segmentation_loss(logits, bad)
  with pytest.raises(ValueError, match="collides"):
    losses.segmentation_loss(logits, labels, ignore_index=1)
  with pytest.raises(ValueError, match="ohem_scope"):
    losses.segmentation_loss(logits, labels, kind="ohem", ohem_scope="dataset")


# ----------------------------------------------------------------------------------------------
# Classifier loss.
# ----------------------------------------------------------------------------------------------
def test_bce_with_logits_matches_formula_and_is_stable():
  x = np.array([[0.0, 2.0], [-3.0, 100.0], [-100.0, 0.5]], np.float32)
  t = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
  want = np.mean([[-math.log(1 / (1 + math.exp(-xv))) if tv else -math.log(1 - 1 / (1 + math.exp(-xv)))
                   for xv, tv in zip(xr, tr)] for xr, tr in zip(x.astype(np.float64), t)])
  got = losses.bce_with_logits(x, t)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  np.testing.assert_allclose(float(losses.bce_with_logits(np.zeros((4, 2)), np.ones((4, 2)))), math.log(2), rtol=1e-6)
  g = jax.grad(lambda z: losses.bce_with_logits(z, t))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(g), (1 / (1 + np.exp(-x.astype(np.float64))) - t) / 6, atol=1e-7)
  with pytest.raises(ValueError, match="equal shape"):
    losses.bce_with_logits(x, t[:, :1])


def test_kth_smallest_bisection_matches_sort():
  rng = np.random.default_rng(5)
  x = rng.random((3, 50)).astype(np.float32)
  x[0, :10] = 0.25            # ties
  x[1, :5] = 0.0              # zeros
  x[2, -3:] = 1.0             # ones
  valid = rng.random((3, 50)) < 0.8
  idx = np.array([0, 7, valid[2].sum() - 1], np.int32)
  got = np.asarray(losses._kth_smallest(jnp.asarray(x), jnp.asarray(valid), jnp.asarray(idx)))
  want = [np.sort(x[r][valid[r]])[idx[r]] for r in range(3)]
  np.testing.assert_array_equal(got, want)


def test_loss_share_on_label_errors_by_hand():
  # One 1x4 image: labels [1, 1, 0, 255], truth [1, 0, 0, 0] -> pixel 1 is wrong, pixel 3 ignored.
  labels = np.array([[[1, 1, 0, 255]]])
  truth = np.array([[[1, 0, 0, 0]]])
  ce = np.array([[[0.1, 2.0, 0.3, 0.0]]])
  w = np.array([[[1.5, 0.5, 1.0, 0.0]]])
  got = losses.loss_share_on_label_errors(w, ce, labels, truth)
  assert got["wrong_pixel_fraction"] == pytest.approx(1 / 3)
  assert got["ce_share_wrong"] == pytest.approx(2.0 / 2.4)
  assert got["loss_share_wrong"] == pytest.approx(1.0 / (0.15 + 1.0 + 0.3))
  assert got["mean_weight_right"] == pytest.approx(1.25)
  assert got["mean_weight_wrong"] == pytest.approx(0.5)
  # OEEM weights from real logits: the confidently wrong pixel gets less than the mean weight 1.
  logits = jnp.array([[[[0.0, 3.0], [0.0, 3.0], [3.0, 0.0]]]])  # predicts 1, 1, 0
  y = jnp.array([[[1, 0, 0]]])                                     # pixel 1 labelled 0: hard
  w_oeem = losses.loss_weights(logits, y, "oeem")
  s = losses.loss_share_on_label_errors(w_oeem, losses.cross_entropy_map(logits, y), y,
                                        np.array([[[1, 1, 0]]]))
  assert s["mean_weight_wrong"] < 1 < s["mean_weight_right"]
  assert s["loss_share_wrong"] < s["ce_share_wrong"]
  with pytest.raises(ValueError, match="shapes differ"):
    losses.loss_share_on_label_errors(w[..., :3], ce, labels, truth)


def test_the_config_check_lists_the_same_loss_kinds():
  from oeem_jax.config import check as config_check

  # config.check spells the kinds out so that checking a config imports no jax; they must agree.
  assert config_check.LOSS_KINDS == losses.KINDS
