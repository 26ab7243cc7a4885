"""The OEEM loss family (paper §2.2, Eq. 3-8; Table 3) and the classifier's BCE loss.

Every segmentation loss here is a weighted cross-entropy (paper Eq. 3)

    loss = sum_{n,h,w} W[n,h,w] * L[n,h,w] / D

with L the per-pixel cross-entropy map (0 at ignored pixels), W a per-pixel weight map that is a
constant for the gradient (`jax.lax.stop_gradient`), and D the denominator of the mean. The kinds
differ only in W:

  kind      W                                                            source
  "ce"      1                                                            plain cross-entropy
  "oeem"    exp(-L) / mean_image(exp(-L))  (= W_l_norm)                  Eq. 6 (the paper's choice)
  "c_max"   max_c softmax(logits)                                        Eq. 4
  "c_diff"  max_c softmax(logits) - min_c softmax(logits)                Eq. 5
  "lc_mix"  W_l_norm * max_c softmax(logits)                             Eq. 7
  "ohem"    1 on mined hard pixels, 0 elsewhere (mmseg OHEMPixelSampler)  Table 3 baseline

Eq. 8: for the weighted kinds ("oeem", "c_max", "c_diff", "lc_mix") an image whose labels (after
ignore) hold at most one class uses W = 1, i.e. plain CE; this is decided per image inside the
batch with array ops (no Python loop over images, no host round trip).

Ignored pixels, two conventions:
  * default (`reference_compat=False`): ignored pixels are outside the method. They get W = 0, the
    per-image softmax / mean of Eq. 6-7 run over the image's valid pixels only, and D is the number
    of valid pixels in the batch. An image without a valid pixel contributes 0; a batch without one
    returns 0 (never NaN).
  * `reference_compat=True` reproduces the reference code (docs/reference.md §5, the mmseg 0.8.0
    cross-entropy it lives in): L = 0 at ignored pixels but they stay in the per-image softmax/mean
    over all H*W pixels (so they get the largest weight, exp(0)), and D = N*H*W counts every pixel.
    With padding (labels 255) this shrinks the loss and shifts weight away from valid pixels.

OHEM (kind "ohem") follows mmseg's `OHEMPixelSampler` with a probability threshold: let p be the
softmax probability of the labelled class at valid pixels, sorted ascending; the threshold is
max(p_sorted[min(k, n_valid - 1)], thresh) and the pixels with p < threshold get W = 1 (ties at the
threshold are dropped, as in mmseg). The default scope is one image (k = min_kept, threshold per
image), which keeps an image's loss independent of the batch. mmseg itself pools the batch
(k = min_kept * N over all valid pixels of the batch) and averages over N*H*W; `ohem_scope="batch"`
gives the pooling, and `reference_compat=True` gives both (exact mmseg behaviour). `min_kept`
defaults to mmseg's 100,000 for its 512x1024 crops scaled by pixel count to the actual crop:
round(100000 * H * W / (512 * 1024)), i.e. 12,500 for 256x256 crops.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

KINDS = ("ce", "oeem", "c_max", "c_diff", "lc_mix", "ohem")
WEIGHTED_KINDS = ("oeem", "c_max", "c_diff", "lc_mix")
OHEM_SCOPES = ("image", "batch")

# mmseg's OHEM default `min_kept=100000` was set for Cityscapes crops of 512x1024 pixels.
MMSEG_OHEM_MIN_KEPT = 100_000
MMSEG_OHEM_CROP_PIXELS = 512 * 1024


def default_ohem_min_kept(height: int, width: int) -> int:
  """mmseg's `min_kept` (100,000 for 512x1024 crops) scaled by pixel count to an HxW crop.

  Args:
    height, width: crop size in pixels (positive ints).
  Returns:
    round(100000 * height * width / (512 * 1024)), at least 1; 12,500 for 256x256.
  """
  return max(1, int(round(MMSEG_OHEM_MIN_KEPT * height * width / MMSEG_OHEM_CROP_PIXELS)))


def _check_inputs(logits: Any, labels: Any, kind: str, ignore_index: int, ohem_scope: str | None,
                  thresh: float, min_kept: int | None) -> None:
  if kind not in KINDS:
    raise ValueError(f"loss kind {kind!r} unknown; expected one of {KINDS}")
  if ohem_scope is not None and ohem_scope not in OHEM_SCOPES:
    raise ValueError(f"ohem_scope {ohem_scope!r} unknown; expected one of {OHEM_SCOPES} or None")
  if not 0.0 <= float(thresh) <= 1.0:
    raise ValueError(f"thresh must be a probability in [0, 1], got {thresh}")
  if min_kept is not None and int(min_kept) < 0:
    raise ValueError(f"min_kept must be >= 0, got {min_kept}")
  if jnp.ndim(logits) != 4:
    raise ValueError(f"logits must be float[N, H, W, C], got shape {jnp.shape(logits)}")
  if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
    raise ValueError(f"logits must have a float dtype, got {jnp.result_type(logits)}")
  if tuple(jnp.shape(labels)) != tuple(jnp.shape(logits)[:3]):
    raise ValueError(f"labels must be int[N, H, W] matching logits[:3] = {tuple(jnp.shape(logits)[:3])}, "
                     f"got shape {tuple(jnp.shape(labels))}")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"labels must have an integer dtype, got {jnp.result_type(labels)}")
  num_classes = jnp.shape(logits)[-1]
  if 0 <= ignore_index < num_classes:
    raise ValueError(f"ignore_index {ignore_index} collides with a class id (C = {num_classes})")
  # Value check only when the labels are concrete (an eager call); under jit it is skipped and
  # values outside {0..C-1} are treated like ignore_index.
  if not isinstance(labels, jax.core.Tracer):
    lab = np.asarray(labels)
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= num_classes))
    if bad.any():
      raise ValueError(f"labels must lie in 0..{num_classes - 1} or equal ignore_index={ignore_index}; "
                       f"found {np.unique(lab[bad])[:10].tolist()}")


def _per_image_lnorm(ce: jax.Array, mask: jax.Array) -> jax.Array:
  """W_l_norm of Eq. 6 per image: exp(-L) / mean(exp(-L)) over the pixels where `mask` is true.

  Numerically stable: shifted by the image's smallest L (the softmax max-trick), so the
  denominator is >= 1/n and never 0. Images with an empty mask get 0. Shapes [N, H, W].
  """
  big = jnp.asarray(jnp.inf, ce.dtype)
  lmin = jnp.min(jnp.where(mask, ce, big), axis=(1, 2), keepdims=True)
  lmin = jnp.where(jnp.isfinite(lmin), lmin, 0.0)
  e = jnp.where(mask, jnp.exp(-(ce - lmin)), 0.0)
  count = jnp.sum(mask, axis=(1, 2), keepdims=True).astype(ce.dtype)
  mean = jnp.sum(e, axis=(1, 2), keepdims=True) / jnp.maximum(count, 1.0)
  return jnp.where(count > 0, e / jnp.where(count > 0, mean, 1.0), 0.0)


def _kth_smallest(x: jax.Array, valid: jax.Array, idx: jax.Array) -> jax.Array:
  """Exact idx-th smallest (0-based) valid entry of each row: float32[R, P] -> float32[R].

  Requires 0 <= x <= 1 at valid entries and 0 <= idx < n_valid (rows with no valid entry return
  garbage and must be masked by the caller). Instead of sorting, bisects over the float32 bit
  patterns, which are ordered like the values for non-negative floats: 31 counting passes over the
  row, O(31 P) and no data-dependent shapes (`jnp.sort` made the OHEM loss >10x slower on CPU).
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  bits = jnp.where(valid, bits, jnp.iinfo(jnp.int32).max)
  need = (idx + 1)[:, None]

  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits <= mid[:, None], axis=1, keepdims=True, dtype=jnp.int32) >= need
    return jnp.where(enough[:, 0], lo, mid + 1), jnp.where(enough[:, 0], mid, hi)

  one = jax.lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32)
  lo = jnp.zeros(x.shape[:1], jnp.int32)
  hi = jnp.full(x.shape[:1], one, jnp.int32)
  lo, _ = jax.lax.fori_loop(0, 31, body, (lo, hi))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _ohem_keep(p_true: jax.Array, valid: jax.Array, thresh: jax.Array, k: jax.Array) -> jax.Array:
  """mmseg OHEMPixelSampler (thresh mode) over the rows of p_true: float32[R, P] -> bool[R, P].

  threshold = max(sorted valid p[min(k, n_valid - 1)], thresh); keep valid pixels with p < threshold
  (a row without valid pixels keeps nothing). The order statistic only matters when it exceeds `thresh`,
  i.e. when at most k valid pixels lie below `thresh`; it is searched for only if some row needs it.
  """
  n_valid = jnp.sum(valid, axis=1, dtype=jnp.int32)
  idx = jnp.clip(jnp.minimum(k, n_valid - 1), 0, None)
  below = jnp.sum(valid & (p_true < thresh), axis=1, dtype=jnp.int32)
  needs_kth = (n_valid > 0) & (below <= idx)
  kth = jax.lax.cond(jnp.any(needs_kth), lambda: _kth_smallest(p_true, valid, idx),
                     lambda: jnp.zeros(p_true.shape[:1], jnp.float32))
  threshold = jnp.where(needs_kth, jnp.maximum(kth, thresh), thresh)
  return valid & (p_true < threshold[:, None])


@functools.partial(jax.jit, static_argnames=("kind", "ignore_index", "reference_compat",
                                             "single_class_ce", "ohem_scope"))
def _weights_and_terms(logits: jax.Array, labels: jax.Array, thresh: jax.Array, min_kept: jax.Array, *,
                       kind: str, ignore_index: int, reference_compat: bool, single_class_ce: bool,
                       ohem_scope: str | None):
  """Returns (W, L, D): weights float32[N,H,W] (stop-gradient), CE map float32[N,H,W], denominator.

  `thresh` (float32 scalar) and `min_kept` (int32 scalar, already resolved) are traced so that
  changing them does not recompile.
  """
  n, h, w, c = logits.shape
  z = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < c)
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(z, axis=-1)
  onehot = jax.nn.one_hot(safe, c, dtype=jnp.float32)
  ce = jnp.where(valid, -jnp.sum(logp * onehot, axis=-1), 0.0)

  all_pix = jnp.ones_like(valid)
  norm_mask = all_pix if reference_compat else valid
  if reference_compat:
    denom = jnp.asarray(n * h * w, jnp.float32)
  else:
    denom = jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0)

  ce_sg = jax.lax.stop_gradient(ce)
  logp_sg = jax.lax.stop_gradient(logp)
  if kind == "ce":
    weights = norm_mask.astype(jnp.float32)
  elif kind in WEIGHTED_KINDS:
    if kind in ("c_max", "c_diff", "lc_mix"):
      cmax = jnp.exp(jnp.max(logp_sg, axis=-1))
    if kind == "oeem":
      weights = _per_image_lnorm(ce_sg, norm_mask)
    elif kind == "c_max":
      weights = cmax
    elif kind == "c_diff":
      weights = cmax - jnp.exp(jnp.min(logp_sg, axis=-1))
    else:  # lc_mix
      weights = _per_image_lnorm(ce_sg, norm_mask) * cmax
    if single_class_ce:
      # Eq. 8: number of distinct valid labels per image, from a [N, C] presence table.
      present = jnp.any((onehot > 0) & valid[..., None], axis=(1, 2))
      multi = jnp.sum(present, axis=-1) > 1
      weights = jnp.where(multi[:, None, None], weights, 1.0)
    weights = jnp.where(norm_mask, weights, 0.0)
  elif kind == "ohem":
    scope = ohem_scope or ("batch" if reference_compat else "image")
    k = min_kept
    p_true = jnp.clip(jnp.exp(-ce_sg), 0.0, 1.0)
    if scope == "image":
      keep = _ohem_keep(p_true.reshape(n, h * w), valid.reshape(n, h * w), thresh, k)
    else:
      keep = _ohem_keep(p_true.reshape(1, n * h * w), valid.reshape(1, n * h * w), thresh, k * n)
    weights = keep.reshape(n, h, w).astype(jnp.float32)
  else:  # pragma: no cover - checked by the caller
    raise ValueError(kind)
  return jax.lax.stop_gradient(weights), ce, denom


def _resolve(logits, labels, kind, ignore_index, reference_compat, single_class_ce, thresh, min_kept,
             ohem_scope):
  _check_inputs(logits, labels, kind, ignore_index, ohem_scope, thresh, min_kept)
  if min_kept is None:
    min_kept = default_ohem_min_kept(*jnp.shape(logits)[1:3])
  return _weights_and_terms(
      logits, labels, jnp.asarray(thresh, jnp.float32), jnp.asarray(min_kept, jnp.int32), kind=kind,
      ignore_index=int(ignore_index), reference_compat=bool(reference_compat),
      single_class_ce=bool(single_class_ce), ohem_scope=ohem_scope)


def segmentation_loss(logits: jax.Array, labels: jax.Array, *, kind: str = "oeem", ignore_index: int = 255,
                      reference_compat: bool = False, single_class_ce: bool = True, thresh: float = 0.7,
                      min_kept: int | None = None, ohem_scope: str | None = None) -> jax.Array:
  """Weighted pixel cross-entropy of the OEEM family (paper Eq. 3 with the W of Eq. 4-8 / OHEM).

  Args:
    logits: float[N, H, W, C], any float dtype (computed in float32), at label resolution.
    labels: int[N, H, W], values in {0..C-1} or `ignore_index`. Eagerly (outside jit) other values
      raise ValueError; under jit they are treated as ignored.
    kind: "ce" | "oeem" | "c_max" | "c_diff" | "lc_mix" | "ohem" (see the module docstring).
    ignore_index: label value of pixels without supervision (padding), 255 by default.
    reference_compat: reproduce the reference code's handling of ignored pixels (docs/reference.md §5):
      they stay in the per-image weight normalisation and in the denominator N*H*W; for "ohem" the
      sampler pools the batch as mmseg does.
    single_class_ce: Eq. 8, W = 1 for images with at most one valid class (weighted kinds only).
    thresh: OHEM probability threshold (mmseg `thresh`), in [0, 1].
    min_kept: OHEM minimum kept pixels per image (mmseg `min_kept`); None scales mmseg's 100,000 for
      512x1024 to the H x W crop (`default_ohem_min_kept`).
    ohem_scope: "image" (threshold per image) or "batch" (mmseg: min_kept*N over the batch); None
      means "batch" when reference_compat else "image".

  Returns:
    float32 scalar: sum(W * L) / D, D = number of valid pixels in the batch (at least 1), or N*H*W
    with reference_compat. 0 for a batch without valid pixels. Gradients flow through L only.

  Raises:
    ValueError: unknown kind/scope, wrong ranks, shapes or dtypes, out-of-range labels (eager only).
  """
  weights, ce, denom = _resolve(logits, labels, kind, ignore_index, reference_compat, single_class_ce,
                                thresh, min_kept, ohem_scope)
  return jnp.sum(weights * ce) / denom


def loss_weights(logits: jax.Array, labels: jax.Array, kind: str = "oeem", *, ignore_index: int = 255,
                 reference_compat: bool = False, single_class_ce: bool = True, thresh: float = 0.7,
                 min_kept: int | None = None, ohem_scope: str | None = None) -> jax.Array:
  """The weight map W that `segmentation_loss` uses, for inspection and logging.

  Same arguments as `segmentation_loss`. Returns float32[N, H, W], gradient-free. Default mode:
  0 at ignored pixels; for "oeem" the mean over each image's valid pixels is 1 (or W = 1 under
  Eq. 8); "ohem" gives 0/1. With reference_compat ignored pixels carry the reference's weight.
  """
  weights, _, _ = _resolve(logits, labels, kind, ignore_index, reference_compat, single_class_ce,
                           thresh, min_kept, ohem_scope)
  return weights


def cross_entropy_map(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255) -> jax.Array:
  """Per-pixel cross-entropy L (paper Eq. 3 without W): float32[N, H, W], 0 at ignored pixels.

  logits: float[N, H, W, C] (computed in float32); labels: int[N, H, W] in {0..C-1} or ignore_index.
  """
  _, ce, _ = _resolve(logits, labels, "ce", ignore_index, False, True, 0.7, None, None)
  return ce


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Multi-label binary cross-entropy on logits, mean over all N*C entries (PyTorch BCEWithLogitsLoss).

  The classifier stage's loss (docs/reference.md §2, "BCE-with-logits, mean over batch x 2").

  Args:
    logits: float[N, C], any float dtype (computed in float32).
    targets: float or int[N, C] with values in [0, 1] (multi-hot patch labels).
  Returns:
    float32 scalar mean of max(x, 0) - x*t + log(1 + exp(-|x|)) (stable for any |x|; via optax).
  Raises:
    ValueError: if the shapes differ or are not 2-D.
  """
  if jnp.ndim(logits) != 2 or tuple(jnp.shape(logits)) != tuple(jnp.shape(targets)):
    raise ValueError(f"bce_with_logits expects logits[N, C] and targets[N, C] of equal shape, got "
                     f"{tuple(jnp.shape(logits))} and {tuple(jnp.shape(targets))}")
  x = jnp.asarray(logits).astype(jnp.float32)
  t = jnp.asarray(targets).astype(jnp.float32)
  return jnp.mean(optax.losses.sigmoid_binary_cross_entropy(x, t))


def loss_share_on_label_errors(weights: Any, ce: Any, labels: Any, truth: Any, *,
                               ignore_index: int = 255) -> dict[str, float]:
  """How much of a weighted CE loss falls on pixels whose (pseudo-)label is wrong.

  The check the OEEM paper's argument rests on (§2.2): pseudo-mask errors are hard pixels, so a
  loss that mines easy pixels should put less of its weight on them than plain CE does. Here the
  true masks decide which labels are wrong; nothing in training sees them.

  Args:
    weights: float[N, H, W] loss weights W (e.g. `loss_weights`; all ones for plain CE).
    ce: float[N, H, W] per-pixel cross-entropy L against `labels` (`cross_entropy_map`).
    labels: int[N, H, W] training labels (0/1, `ignore_index` = unsupervised).
    truth: int or bool[N, H, W] true classes of the same pixels.

  Returns:
    dict of floats: `wrong_pixel_fraction` (wrong / valid pixels), `loss_share_wrong`
    (sum W*L over wrong pixels / sum W*L over valid pixels, in [0, 1]), `ce_share_wrong` (the same
    with W = 1), `mean_weight_right`, `mean_weight_wrong` (mean W over right / wrong pixels; NaN
    where there are none).

  Raises:
    ValueError: the four arrays differ in shape.
  """
  w, l, y, t = (np.asarray(a) for a in (weights, ce, labels, truth))
  if not (w.shape == l.shape == y.shape == t.shape):
    raise ValueError(f"loss_share_on_label_errors: shapes differ: weights {w.shape}, ce {l.shape}, "
                     f"labels {y.shape}, truth {t.shape}")
  w, l = w.astype(np.float64), l.astype(np.float64)
  valid = y != ignore_index
  wrong = valid & (y != t.astype(y.dtype))
  right = valid & ~wrong

  def ratio(num, den):
    return float(num / den) if den > 0 else float("nan")

  return {
      "wrong_pixel_fraction": ratio(wrong.sum(), valid.sum()),
      "loss_share_wrong": ratio((w * l)[wrong].sum(), (w * l)[valid].sum()),
      "ce_share_wrong": ratio(l[wrong].sum(), l[valid].sum()),
      "mean_weight_right": ratio(w[right].sum(), right.sum()),
      "mean_weight_wrong": ratio(w[wrong].sum(), wrong.sum()),
  }
