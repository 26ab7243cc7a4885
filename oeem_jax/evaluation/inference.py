"""Test-time inference: sliding window, multi-scale and flip averaging (docs/reference.md §6).

One *pass* tiles an image with windows of `window` pixels at `stride` (the reference's mmseg
"slide" mode: 320 / 256), runs the network on every window, and averages the logits where windows
overlap. `predict_probs` runs one pass per scale (default 0.75 … 3) and per flip (none, horizontal),
resizes each pass's logits back to the image size, applies softmax, undoes the flip and averages
the 16 probability maps (the reference's `aug_test`; no CRF).

Fixed shapes, no recompiles: windows from all passes of an image are streamed into batches of
exactly `[batch_size, window, window, 3]` (the last batch of an image and windows of an image
smaller than the window are zero-padded; results are cropped), so a jitted `apply_fn` compiles once
whatever the image sizes, scales or number of images. All resizing, tiling and stitching happens
on the host in NumPy / `tf.image.resize` (eager TF kernels, nothing compiled per shape).

Differences from the reference, by design:
* An image side shorter than the window is zero-padded (in normalised space, i.e. the mean colour,
  as the training crops are padded, docs/reference.md §4) up to the window; the reference runs the
  smaller crop as is. A model with global context (pyramid pooling) sees the padding.
* The resized image is rounded back to uint8 before normalising, as the reference's uint8 resize
  does; interpolation is bilinear with half-pixel centres and no antialiasing (docs/reference.md,
  porting notes) rather than OpenCV's fixed-point version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
from scipy.special import softmax

from oeem_jax.config.scales import INFERENCE_SCALES

ApplyFn = Callable[[np.ndarray], "np.ndarray"]


def window_starts(length: int, window: int = 320, stride: int = 256) -> list[int]:
  """Start offsets of the sliding windows along one side (docs/reference.md §6).

  Count = (length − window + stride − 1) // stride + 1; window k starts at min(k·stride,
  length − window), so the last window is flush with the border. A side no longer than the window
  gets one window at 0 (the caller pads the image to the window).

  Args:
    length: side length in pixels (>= 1).
    window: window side in pixels (>= 1).
    stride: step between windows in pixels (1 <= stride).

  Returns:
    Sorted list of start offsets (ints).

  Raises:
    ValueError: a non-positive argument.
  """
  if length < 1 or window < 1 or stride < 1:
    raise ValueError(f"window_starts: length, window and stride must be >= 1, got "
                     f"{length}, {window}, {stride}")
  if length <= window:
    return [0]
  count = (length - window + stride - 1) // stride + 1
  return [min(k * stride, length - window) for k in range(count)]


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
  """Image size after rescaling by `scale`: int(side·scale + 0.5) (as mmcv's `imrescale`)."""
  return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_bilinear_host(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize on the host (NumPy in, NumPy out), half-pixel centres, no antialiasing.

  The in-graph JAX counterpart of the networks is `oeem_jax.models.pspnet.resize_bilinear`.

  Uses `tf.image.resize` on the host (eager TF kernels: no compile per shape, unlike an eager
  `jax.image.resize`, and ~25x faster than `scipy.ndimage.zoom`). Same result as PyTorch's
  `F.interpolate(mode="bilinear", align_corners=False)`.

  Args:
    x: float[H, W, C] (any real dtype).
    size: (height, width) of the output, each >= 1.

  Returns:
    float32[height, width, C] (a copy; `x` itself when the size is unchanged).
  """
  x = np.asarray(x, dtype=np.float32)
  if x.ndim != 3:
    raise ValueError(f"resize_bilinear_host: expected [H, W, C], got shape {x.shape}")
  if tuple(size) == x.shape[:2]:
    return x
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow import, only when needed)

  return tf.image.resize(x, tuple(size), method="bilinear", antialias=False).numpy()


# Logit margin of the filled class where a pixel's windows were all skipped (softmax ~ 1 - 1e-13).
SKIPPED_LOGIT = 30.0
# A window predicate: (y0, y1, x0, x1), half-open, in pixels -> whether to run the window.
WindowKeep = Callable[[float, float, float, float], bool]


class _Pass:
  """One image being tiled: padded input, window offsets, logit sums and the finish callback.

  With `keep`, windows it refuses are not run; a pixel's logits are then the mean over the windows
  that ran, and a pixel no run window covers gets logits (SKIPPED_LOGIT, 0, ...): class 0.
  """

  def __init__(self, image: np.ndarray, done: Callable[[np.ndarray], None], window: int,
               stride: int, keep: WindowKeep | None = None, num_classes: int = 0):
    h, w = image.shape[:2]
    self.height, self.width = h, w
    ph, pw = max(h, window), max(w, window)
    if (ph, pw) != (h, w):
      image = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)))
    self.image = image
    self.done = done
    ys, xs = window_starts(h, window, stride), window_starts(w, window, stride)
    coords = [(y, x) for y in ys for x in xs]
    self.sum: np.ndarray | None = None  # float32[ph, pw, C], created with the first outputs
    self.kept_count: np.ndarray | None = None  # float32[ph, pw] with `keep`: run windows per pixel
    if keep is None:
      self.coords = coords
      # Windows form a grid, so the number covering (y, x) is rows(y) * cols(x).
      rows, cols = np.zeros(ph, np.float32), np.zeros(pw, np.float32)
      for y in ys:
        rows[y:y + window] += 1
      for x in xs:
        cols[x:x + window] += 1
      self.count = np.outer(rows[:h], cols[:w])[..., None]
    else:
      if num_classes < 1:
        raise ValueError("a window filter needs num_classes >= 1 (the logits of skipped pixels)")
      self.coords = [(y, x) for y, x in coords
                     if keep(y, min(h, y + window), x, min(w, x + window))]
      self.kept_count = np.zeros((ph, pw), np.float32)
      self.num_classes = num_classes
    self.remaining = len(self.coords)
    if self.remaining == 0:
      self._finish()

  def add(self, y: int, x: int, logits: np.ndarray, window: int) -> None:
    if self.sum is None:
      self.sum = np.zeros(self.image.shape[:2] + logits.shape[-1:], np.float32)
    self.sum[y:y + window, x:x + window] += logits
    if self.kept_count is not None:
      self.kept_count[y:y + window, x:x + window] += 1
    self.remaining -= 1
    if self.remaining == 0:
      self._finish()

  def _finish(self) -> None:
    h, w = self.height, self.width
    if self.kept_count is None:
      self.done(self.sum[:h, :w] / self.count)
    else:
      c = self.num_classes if self.sum is None else self.sum.shape[-1]
      fill = np.zeros(c, np.float32)
      fill[0] = SKIPPED_LOGIT
      count = self.kept_count[:h, :w, None]
      if self.sum is None:
        out = np.broadcast_to(fill, (h, w, c)).copy()
      else:
        out = np.where(count > 0, self.sum[:h, :w] / np.maximum(count, 1), fill)
      self.done(out)
    self.sum = self.image = self.kept_count = None  # free memory early


def _run_passes(apply_fn: ApplyFn, passes: Iterable[tuple], *, window: int, stride: int,
                batch_size: int, num_classes: int = 0) -> None:
  """Streams the windows of all passes through `apply_fn` in fixed-shape batches.

  `passes` yields (image float32[H, W, 3], done) or (image, done, keep); `done(logits float32[H, W,
  C])` is called as soon as all windows of that pass are back. `keep` (a `WindowKeep` in the pass's
  pixels, or None) drops windows (see `_Pass`; needs `num_classes`). Passes are consumed lazily, so
  only the passes with windows in the current batch are held in memory.
  """
  if window < 1 or stride < 1 or batch_size < 1:
    raise ValueError(f"window, stride and batch_size must be >= 1, got {window}, {stride}, "
                     f"{batch_size}")
  batch = np.zeros((batch_size, window, window, 3), np.float32)
  pending: list[tuple[_Pass, int, int]] = []

  def flush() -> None:
    for k, (p, y, x) in enumerate(pending):
      batch[k] = p.image[y:y + window, x:x + window]
    batch[len(pending):] = 0.0
    out = np.asarray(apply_fn(batch), dtype=np.float32)
    if out.ndim != 4 or out.shape[:3] != (batch_size, window, window):
      raise ValueError(f"apply_fn must map float32[{batch_size}, {window}, {window}, 3] to "
                       f"float32[{batch_size}, {window}, {window}, C], got shape {out.shape}")
    for k, (p, y, x) in enumerate(pending):
      p.add(y, x, out[k], window)
    pending.clear()

  for item in passes:
    image, done = item[0], item[1]
    keep = item[2] if len(item) > 2 else None
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected an image float32[H, W, 3], got shape {image.shape}")
    p = _Pass(image, done, window, stride, keep, num_classes)
    for y, x in p.coords:
      pending.append((p, y, x))
      if len(pending) == batch_size:
        flush()
  if pending:
    flush()


def sliding_window_logits(apply_fn: ApplyFn, image: np.ndarray, *, window: int = 320,
                          stride: int = 256, batch_size: int = 8) -> np.ndarray:
  """Logits of one image by sliding-window inference (docs/reference.md §6, one pass).

  Args:
    apply_fn: maps float32[batch_size, window, window, 3] to float32[batch_size, window, window,
      C] logits (jit it once; it is only ever called with that one shape).
    image: float32[H, W, 3], already normalised; any H, W >= 1.
    window: window side (320 in the reference); stride: step (256).
    batch_size: windows per `apply_fn` call (the last call is zero-padded).

  Returns:
    float32[H, W, C]: logits averaged over the windows covering each pixel.

  Raises:
    ValueError: bad image shape, bad sizes, or `apply_fn` returns the wrong shape.
  """
  result: list[np.ndarray] = []
  _run_passes(apply_fn, [(image, result.append)], window=window, stride=stride,
              batch_size=batch_size)
  return result[0]


def predict_probs(apply_fn: ApplyFn, image: np.ndarray, *,
                  normalize: Callable[[np.ndarray], np.ndarray],
                  scales: Sequence[float] = INFERENCE_SCALES, flip: bool = True, window: int = 320,
                  stride: int = 256, batch_size: int = 8, keep: WindowKeep | None = None,
                  num_classes: int = 0) -> np.ndarray:
  """Class probabilities of one image: multi-scale × flip sliding-window inference (docs/reference.md §6).

  For each scale s: resize the image to `scaled_size(H, W, s)` (bilinear, half-pixel, no
  antialias; rounded to uint8 as the reference), normalise, and for the unflipped and (if `flip`)
  the horizontally flipped copy: sliding-window logits, bilinear resize back to H × W, softmax over
  classes, undo the flip. The probability maps of all passes are averaged.

  Args:
    apply_fn: as in `sliding_window_logits` (one compile for every image and scale).
    image: uint8[H, W, 3] RGB image.
    normalize: maps float32[h, w, 3] RGB in [0, 255] to the network's float32[h, w, 3] input
      (e.g. ImageNet mean/std, docs/reference.md §1).
    scales: resize ratios (the paper's eight by default); each > 0.
    flip: add horizontally flipped passes.
    window, stride, batch_size: as in `sliding_window_logits`.
    keep: optional window predicate in `image` pixels, (y0, y1, x0, x1) -> bool (half-open, floats:
      a scaled window maps back to fractional image pixels; e.g. tissue detection,
      `oeem_jax.predict.tissue.WindowFilter.any_tissue`). A window it refuses is not run, in any
      pass; pixels no run window covers get class 0 (probability ~1). None = every window (eval).
    num_classes: C, required with `keep` (the output of a pass whose windows were all refused).

  Returns:
    float32[H, W, C] probabilities (each pixel sums to 1).

  Raises:
    ValueError: image not uint8[H, W, 3], empty or non-positive scales, a bad `apply_fn`, or `keep`
      without `num_classes`.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"predict_probs: expected uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
  if not scales or min(scales) <= 0:
    raise ValueError(f"predict_probs: scales must be a non-empty list of positive ratios, got "
                     f"{scales}")
  height, width = image.shape[:2]
  total: list[np.ndarray] = []  # one running sum, created with the first pass

  def finisher(flipped: bool) -> Callable[[np.ndarray], None]:
    def done(logits: np.ndarray) -> None:
      probs = softmax(resize_bilinear_host(logits, (height, width)), axis=-1)
      if flipped:
        probs = probs[:, ::-1]
      if total:
        total[0] += probs
      else:
        total.append(probs.astype(np.float32))
    return done

  def pass_keep(size: tuple[int, int], flipped: bool) -> WindowKeep | None:
    """`keep` in the pixels of a pass of `size` (h, w), flipped or not."""
    if keep is None:
      return None
    fy, fx = height / size[0], width / size[1]
    if flipped:
      return lambda y0, y1, x0, x1: keep(y0 * fy, y1 * fy, (size[1] - x1) * fx, (size[1] - x0) * fx)
    return lambda y0, y1, x0, x1: keep(y0 * fy, y1 * fy, x0 * fx, x1 * fx)

  def passes():
    source = image.astype(np.float32)
    for s in scales:
      size = scaled_size(height, width, s)
      scaled = np.clip(np.rint(resize_bilinear_host(source, size)), 0, 255)
      net_in = np.asarray(normalize(scaled), dtype=np.float32)
      if net_in.shape != scaled.shape:
        raise ValueError(f"predict_probs: normalize changed the shape {scaled.shape} -> "
                         f"{net_in.shape}")
      yield net_in, finisher(False), pass_keep(size, False)
      if flip:
        yield np.ascontiguousarray(net_in[:, ::-1]), finisher(True), pass_keep(size, True)

  _run_passes(apply_fn, passes(), window=window, stride=stride, batch_size=batch_size,
              num_classes=num_classes)
  return total[0] / np.float32(len(scales) * (2 if flip else 1))


def remove_small_regions(mask: np.ndarray, *, min_object_area: int = 0,
                         max_hole_area: int = 0) -> np.ndarray:
  """Optional post-processing of a binary gland mask: drop small objects, fill small holes.

  Not in the paper or the reference code (both score the raw argmax); off by default in the paper
  configuration. Small false-positive specks are what drags the GlaS *object* F1 down (each speck is
  one false object), while pixel mIoU barely moves. Objects are 8-connected (as in
  `oeem_jax.evaluation.metrics.label_instances`), holes 4-connected (the dual); uses `skimage.morphology`.

  Args:
    mask: bool/uint8[H, W] binary prediction (non-zero = gland).
    min_object_area: gland components with fewer pixels than this are set to non-gland (0 = keep
      all). In pixels of the image as scored (GlaS: 20x, 0.62 µm/px).
    max_hole_area: non-gland components enclosed by gland with fewer pixels than this are set to
      gland (0 = fill none). GlaS annotations include the gland lumen in the gland.

  Returns:
    uint8[H, W] with values 0/1.

  Raises:
    ValueError: mask not 2-D, or a negative area.
  """
  from skimage import morphology

  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"remove_small_regions: expected a 2-D mask, got shape {mask.shape}")
  if min_object_area < 0 or max_hole_area < 0:
    raise ValueError(f"remove_small_regions: areas must be >= 0, got min_object_area="
                     f"{min_object_area}, max_hole_area={max_hole_area}")
  out = mask > 0
  # skimage >= 0.26 takes `max_size` (removes sizes <= max_size); older ones `min_size` (< min_size).
  if min_object_area > 1:
    out = _skimage_call(morphology.remove_small_objects, out, min_object_area, connectivity=2)
  if max_hole_area > 1:
    out = _skimage_call(morphology.remove_small_holes, out, max_hole_area, connectivity=1)
  return out.astype(np.uint8)


def _skimage_call(fn, mask: np.ndarray, area: int, **kwargs) -> np.ndarray:
  """Calls a skimage small-region filter removing regions of fewer than `area` pixels."""
  try:
    return fn(mask, max_size=area - 1, **kwargs)
  except TypeError:  # scikit-image < 0.26
    return fn(mask, area, **kwargs)
