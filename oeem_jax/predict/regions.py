"""Region-by-region prediction of images of any size, with bounded memory.

An image is cut into a grid of *cores* (about `region_size` px a side, split evenly, so no sliver is
left at the border). Each core is read with a *margin* of at least one sliding window at the smallest
effective scale (`region_margin`), predicted with the same multi-scale × flip sliding-window
inference as stage `eval` (`oeem_jax.evaluation.inference.predict_probs`), and only its core is kept. The
gland mask of the whole image is the only full-size array (uint8, 1 byte per pixel).

Exactness: the read window of a region is widened so that its left and top edges sit on multiples
of an alignment step counted from the image's left/top edge, and its right and bottom edges on
multiples counted from the right/bottom edge. The step (`region_align`) is the smallest multiple of
the window stride that is a whole number of strides at every effective scale (stride 192 at scales
0.75, 1, 1.25: 768 px). Every window that covers a core pixel is then the same window as in
whole-image inference, unflipped and flipped, at every scale: at effective scale 1 with the same
pixels, so the result is bit for bit the whole-image one; at other scales `scaled_size` rounds each
side, so the resized pixels can differ at the sub-pixel level (tests/test_predict.py: no pixel
differed on its images). The price is overlap: a read window is up to core + 2 x (margin + step),
which is why regions are large (`predict.region_size`, default 4096). `align=False` aligns to the
stride only (less overlap; exact at scale 1 only).

One compile: every region of every image goes through the same `apply_fn` with one window batch
shape.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from absl import logging

from oeem_jax.evaluation import inference

if TYPE_CHECKING:
  from oeem_jax.predict.tissue import WindowFilter


@dataclasses.dataclass(frozen=True)
class Region:
  """One region: the core (kept) and the read window (core plus margins), in image pixels,
  half-open ([y0, y1) x [x0, x1))."""
  y0: int
  y1: int
  x0: int
  x1: int
  read_y0: int
  read_y1: int
  read_x0: int
  read_x1: int


def axis_plan(length: int, core: int, margin: int, align: int) -> list[tuple[int, int, int, int]]:
  """Cores and read windows along one side (see the module docstring).

  Args:
    length: side of the image (px, >= 1).
    core: target core side (px, >= 1); the side is split into ceil(length / core) equal-ish cores.
    margin: minimum context on each side of a core (px, >= 0).
    align: read starts are multiples of `align` from 0, read ends multiples from `length` (px, >= 1).

  Returns:
    [(core_start, core_end, read_start, read_end)] covering [0, length) with the cores.

  Raises:
    ValueError: a non-positive size.
  """
  if length < 1 or core < 1 or margin < 0 or align < 1:
    raise ValueError(f"axis_plan: length {length}, core {core}, align {align} must be >= 1 and "
                     f"margin {margin} >= 0")
  n = -(-length // core)
  cuts = [(k * length) // n for k in range(n + 1)]
  out = []
  for a, b in zip(cuts[:-1], cuts[1:]):
    start = max(0, ((a - margin) // align) * align)
    end = min(length, length - ((length - b - margin) // align) * align)
    out.append((a, b, start, end))
  return out


def plan_regions(height: int, width: int, *, region_size: int, margin: int,
                 align: int) -> list[Region]:
  """The regions of an image, row by row (see `axis_plan` for the arguments)."""
  rows = axis_plan(height, region_size, margin, align)
  cols = axis_plan(width, region_size, margin, align)
  return [Region(y0, y1, x0, x1, ry0, ry1, rx0, rx1)
          for (y0, y1, ry0, ry1) in rows for (x0, x1, rx0, rx1) in cols]


def region_margin(window: int, scales: Sequence[float], rescale: float = 1.0) -> int:
  """Context (input px) around a core: one window at the smallest effective scale, plus 2 px for
  the bilinear resizes: ceil(window / (min(scales) * rescale)) + 2."""
  return math.ceil(window / (min(scales) * rescale)) + 2


def region_align(stride: int, scales: Sequence[float], rescale: float = 1.0,
                 max_factor: int = 16) -> int:
  """Step (input px) that region read windows are aligned to: the smallest multiple A of `stride`
  (up to `max_factor` x stride) such that A x s x rescale is a multiple of `stride` for every scale
  s, so that the sliding-window grid of each scaled pass starts at the same place in a region as in
  the whole image (e.g. stride 192, scales 0.75 / 1 / 1.25: A = 768); `stride` when there is none
  (an arbitrary pixel-size ratio)."""
  for k in range(1, max_factor + 1):
    a = k * stride
    if all(abs(a * s * rescale / stride - round(a * s * rescale / stride)) < 1e-6 for s in scales):
      return a
  return stride


def format_eta(seconds: float) -> str:
  """h:mm:ss, or "?" when not finite."""
  if not math.isfinite(seconds):
    return "?"
  s = int(round(seconds))
  return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def predict_mask(apply_fn: inference.ApplyFn, read: Callable[[int, int, int, int], np.ndarray],
                 height: int, width: int, *, normalize: Callable[[np.ndarray], np.ndarray],
                 scales: Sequence[float], flip: bool, window: int, stride: int, batch_size: int,
                 rescale: float = 1.0, region_size: int = 4096, align: bool = True,
                 name: str = "", tissue: "WindowFilter | None" = None, num_classes: int = 2,
                 stats: dict | None = None) -> np.ndarray:
  """Gland mask of an image of any size, region by region (module docstring).

  Args:
    apply_fn: float32[batch_size, window, window, 3] -> float32[batch_size, window, window, C]
      logits (jitted once, e.g. `oeem_jax.models.segmenter_apply_fn`).
    read: (y0, y1, x0, x1) -> uint8[y1 - y0, x1 - x0, 3] RGB of the image (e.g.
      `oeem_jax.predict.images.ImageSource.read`).
    height, width: image size (px).
    normalize: RGB 0..255 float32[h, w, 3] -> network input (as in `inference.predict_probs`).
    scales: the model's test scales; each is multiplied by `rescale`.
    flip: add horizontally flipped passes.
    window, stride, batch_size: sliding window (network px) and windows per call.
    rescale: input pixel size / model pixel size (1 = no rescaling; 0.5 = the input has twice the
      model's resolution and is predicted at half size).
    region_size: core side (input px).
    align: align read windows for every scale (`region_align`), else to the stride only.
    name: image name for the progress log.
    tissue: optional `oeem_jax.predict.tissue.WindowFilter` of the image: a region whose read
      window holds no tissue is neither read nor predicted, and inside a region only the windows
      that touch tissue run (`inference.predict_probs`, `keep`); what is skipped is class 0.
      None = every window (the same mask as stage eval).
    num_classes: C of the network (with `tissue`: the class 0 of skipped pixels needs it).
    stats: optional dict filled with "windows" (in all passes of all regions that were read),
      "windows_skipped" (of those, refused by `tissue`) and "regions_skipped" (no tissue at all).

  Returns:
    uint8[height, width]: argmax class per pixel (0 = non-gland, 1 = gland), before any
    post-processing.

  Raises:
    ValueError: bad sizes or scales (see `inference.predict_probs`).
  """
  if rescale <= 0 or not scales or min(scales) <= 0:
    raise ValueError(f"predict_mask: rescale {rescale} and scales {tuple(scales)} must be > 0")
  eff = tuple(float(s) * rescale for s in scales)
  margin = region_margin(window, scales, rescale)
  step = region_align(stride, scales, rescale) if align else stride
  regions = plan_regions(height, width, region_size=region_size, margin=margin, align=step)
  mask = np.zeros((height, width), np.uint8)
  start = time.time()
  done_px, total_px = 0, height * width
  counts = {"windows": 0, "windows_skipped": 0, "regions_skipped": 0}
  for k, r in enumerate(regions):
    if tissue is not None and not tissue.any_tissue(r.read_y0, r.read_y1, r.read_x0, r.read_x1):
      counts["regions_skipped"] += 1  # all glass: the core stays class 0, nothing is read
    else:
      keep = None if tissue is None else _counting_keep(tissue, r.read_y0, r.read_x0, counts)
      image = read(r.read_y0, r.read_y1, r.read_x0, r.read_x1)
      probs = inference.predict_probs(apply_fn, image, normalize=normalize, scales=eff, flip=flip,
                                      window=window, stride=stride, batch_size=batch_size,
                                      keep=keep, num_classes=num_classes)
      core = probs[r.y0 - r.read_y0:r.y1 - r.read_y0, r.x0 - r.read_x0:r.x1 - r.read_x0]
      mask[r.y0:r.y1, r.x0:r.x1] = np.argmax(core, axis=-1)
      del image, probs, core
    done_px += (r.y1 - r.y0) * (r.x1 - r.x0)
    elapsed = time.time() - start
    if len(regions) > 1:
      logging.info("predict %s: region %d/%d done (%.0f %% of the pixels), %s elapsed, ETA %s", name,
                   k + 1, len(regions), 100 * done_px / total_px, format_eta(elapsed),
                   format_eta(elapsed / done_px * (total_px - done_px)))
  if stats is not None:
    stats.update(counts)
  return mask


def _counting_keep(tissue, oy: int, ox: int, counts: dict) -> inference.WindowKeep:
  """`tissue.any_tissue` for windows of a region read at (oy, ox), tallying into `counts`."""
  def keep(y0, y1, x0, x1) -> bool:
    ok = tissue.any_tissue(oy + y0, oy + y1, ox + x0, ox + x1)
    counts["windows"] += 1
    counts["windows_skipped"] += not ok
    return ok
  return keep
