"""Evaluation metrics for binary gland segmentation: pixel level and GlaS object level.

Pixel level (docs/reference.md §6, the reference's `count_miou.py` semantics): one confusion matrix
accumulated over the whole split (pixel counts summed over images, not per-image averages), from
which IoU per class, mIoU (the paper's headline column), the gland-class Dice / F1, precision,
recall and accuracy are derived, plus the reference's *derived* "Dice" = 2·mIoU / (1 + mIoU), the
number the paper's Table 1 "Dice" column holds.

Object level (GlaS challenge, Sirinukunwattana et al., Medical Image Analysis 35:489-502, 2017,
and the challenge's evaluation page): predicted objects are the 8-connected components of the
binary prediction (`label_instances`), or with `split_h` > 0 (ours, not in the paper) those
components with touching glands split by a distance-transform watershed (`split_instances`);
ground-truth objects are the annotation's instance ids.

* Object F1 (detection). Each segmented object S is assigned the ground-truth object G*(S) it
  overlaps most (ties: the smallest id, as MATLAB's `mode` in the challenge code). S is a true
  positive when |S ∩ G*(S)| >= 0.5·|G*(S)| ("intersects with at least 50 % of its ground truth"),
  otherwise a false positive (also when it overlaps no ground truth at all). A ground-truth object
  matched by no true-positive S is a false negative. F1 = 2·TP / (2·TP + FP + FN).
  Notes: the challenge's MATLAB `F1score.m` uses a strict `> 0.5` and counts as FN only the ground
  truths that are nobody's G*(S); we follow the published text (>= 50 %; a ground truth covered by
  less than half is a FN). The two differ only when an overlap is exactly half a ground truth or
  when a FP segment's max-overlap ground truth is covered less than half.
* Object Dice: Dice_obj = ½·[Σ_S σ_S·Dice(G*(S), S) + Σ_G γ_G·Dice(G, S*(G))], with
  σ_S = |S| / Σ|S| and γ_G = |G| / Σ|G|, where S*(G) is the segmented object overlapping G most;
  an object with no overlapping partner is compared with the empty set (Dice 0).
* Object Hausdorff: the same formula with the symmetric Hausdorff distance H(G, S) between pixel
  sets (Euclidean, pixel units, all pixels of the objects as in the challenge code); an object with
  no overlapping partner is paired with the object of the other side nearest to it in Hausdorff
  distance. When the other side of its image is empty there is no partner at all: the challenge
  code returns Inf (its helper) or fails; we use the image diagonal sqrt((H-1)² + (W-1)²) (the
  largest Hausdorff distance possible in that image) by default, `unmatched="inf"` gives Inf.

Aggregation over a split: the challenge page defines the weights over the set of *all* objects of a
test part (𝒢 = ∪_a 𝒢_a), so object Dice and Hausdorff are pooled over the split's objects
(area-weighted over the split, not a mean of per-image values), and object F1 uses TP/FP/FN summed
over the split's images. Per-image values (for the CSV) use the same formulas on one image.

Empty cases (per image or pooled): no objects on either side -> F1 1, Dice 1, Hausdorff 0 (the
challenge code's values); objects on one side only -> F1 0, Dice 0, Hausdorff = diagonal (or Inf).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

GLAND = 1  # index of the positive (gland) class

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------------


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int = 2,
                     ignore_index: int = 255) -> np.ndarray:
  """Pixel confusion matrix of one image (docs/reference.md §6); sum the results over a split.

  Args:
    pred: int[H, W] predicted class ids in [0, num_classes).
    gt: int[H, W] true class ids in [0, num_classes), or `ignore_index` for unlabelled pixels
      (those pixels are left out).
    num_classes: C.
    ignore_index: ground-truth value to skip.

  Returns:
    int64[C, C], rows = ground-truth class, columns = predicted class, entries = pixel counts.

  Raises:
    ValueError: shapes differ, arrays are not 2-D, or a value lies outside the class range.
  """
  pred = np.asarray(pred)
  gt = np.asarray(gt)
  if pred.ndim != 2 or pred.shape != gt.shape:
    raise ValueError(f"confusion_matrix: expected pred and gt of the same shape [H, W], got "
                     f"{pred.shape} and {gt.shape}")
  keep = gt != ignore_index
  p = pred[keep].astype(np.int64)
  g = gt[keep].astype(np.int64)
  for name, v in (("pred", pred), ("gt", g)):
    if v.size and (v.min() < 0 or v.max() >= num_classes):
      raise ValueError(f"confusion_matrix: {name} holds values outside [0, {num_classes}) "
                       f"(min {v.min()}, max {v.max()})")
  return np.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(
      num_classes, num_classes).astype(np.int64)


def _ratio(num: float, den: float) -> float:
  return float(num) / float(den) if den > 0 else float("nan")


def pixel_metrics(conf: np.ndarray) -> dict[str, Any]:
  """Pixel metrics from a (split-wide) confusion matrix (docs/reference.md §6).

  Args:
    conf: int[C, C] confusion matrix, rows = ground truth, columns = prediction (from
      `confusion_matrix`, summed over images). Class 1 is the gland (positive) class.

  Returns:
    dict of Python floats in [0, 1] (NaN where a denominator is 0):
      `iou`: list[C], IoU_c = |P=c ∧ G=c| / |P=c ∨ G=c|;
      `miou`: mean of the defined IoU_c (the paper's headline mIoU);
      `dice`, `f1`: 2·TP / (2·TP + FP + FN) of the gland class. For the binary positive class the
        pixel F1 (harmonic mean of precision and recall) IS the pixel Dice; both keys are given
        because the paper has both columns. The paper's "F1" column is not produced by the
        reference code (docs/reference.md §6): for "ours w/o OEEM" (derived Dice 86.13, F1 82.36) it
        is not the derived Dice, for OEEM (87.36 / 87.35) it nearly equals it; it may be this
        pixel F1 but its definition is unknown;
      `precision`, `recall`: of the gland class; `accuracy`: trace / total;
      `reference_dice`: 2·mIoU / (1 + mIoU), the reference's derived "Dice" (the paper's Dice
        column), not a true Dice;
      `pixels`: total counted pixels.

  Raises:
    ValueError: `conf` is not a square 2-D matrix with at least 2 classes.
  """
  conf = np.asarray(conf, dtype=np.float64)
  if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] < 2:
    raise ValueError(f"pixel_metrics: expected a square [C, C] confusion matrix, got {conf.shape}")
  tp_c = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - tp_c
  iou = [_ratio(t, u) for t, u in zip(tp_c, union)]
  defined = [v for v in iou if not math.isnan(v)]
  miou = float(np.mean(defined)) if defined else float("nan")
  tp = conf[GLAND, GLAND]
  fp = conf[:, GLAND].sum() - tp
  fn = conf[GLAND, :].sum() - tp
  dice = _ratio(2 * tp, 2 * tp + fp + fn)
  return {
      "iou": iou,
      "miou": miou,
      "dice": dice,
      "f1": dice,
      "precision": _ratio(tp, tp + fp),
      "recall": _ratio(tp, tp + fn),
      "accuracy": _ratio(tp_c.sum(), conf.sum()),
      "reference_dice": 2 * miou / (1 + miou) if not math.isnan(miou) else float("nan"),
      "pixels": int(conf.sum()),
  }


# --------------------------------------------------------------------------------------------
# Object level (GlaS challenge)
# --------------------------------------------------------------------------------------------


def label_instances(binary: np.ndarray) -> np.ndarray:
  """Instances of a binary prediction: 8-connected components (as the GlaS ids were made).

  Args:
    binary: bool/int[H, W]; nonzero = gland.

  Returns:
    int32[H, W], 0 = background, 1..K = component ids in raster order (scipy.ndimage.label).

  Raises:
    ValueError: input is not 2-D.
  """
  binary = np.asarray(binary)
  if binary.ndim != 2:
    raise ValueError(f"label_instances: expected a 2-D mask [H, W], got shape {binary.shape}")
  labels, _ = ndimage.label(binary != 0, structure=_EIGHT_CONNECTED)
  return labels.astype(np.int32, copy=False)  # no second full-size array when already int32


def check_split_h(h: Any, name: str = "split_h") -> int:
  """`h` as an int after checking it is an integer >= 0 (bool refused); the ValueError names `name`."""
  if isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 0:
    raise ValueError(f"{name}: expected an integer number of pixels >= 0 (0 = no splitting), "
                     f"got {h!r}")
  return int(h)


def _raster_order(labels: np.ndarray) -> np.ndarray:
  """Renumbers the ids > 0 of `labels` to 1..K in raster order of their first pixel (0 kept)."""
  flat = labels.ravel()
  ids, first = np.unique(flat, return_index=True)
  keep = ids > 0
  ids, first = ids[keep], first[keep]
  lut = np.zeros(int(flat.max(initial=0)) + 1, np.int32)
  lut[ids[np.argsort(first, kind="stable")]] = np.arange(1, len(ids) + 1, dtype=np.int32)
  return lut[labels]


def split_instances(binary: np.ndarray, h: int) -> np.ndarray:
  """Instances of a binary prediction with touching glands split by a distance-transform watershed.

  Post-processing of ours, not in the paper or the reference code (like
  `inference.remove_small_regions`); it changes only how the object metrics (and predict's
  per-gland outputs) cut the gland pixels into objects, never which pixels are gland, so the pixel
  metrics are unchanged. Steps (all scipy / scikit-image):

  1. `d = scipy.ndimage.distance_transform_edt(binary)`: Euclidean distance (pixels) of each gland
     pixel to the nearest non-gland pixel.
  2. Markers: the h-maxima of `d` (`skimage.morphology.h_maxima(d, h)`, 8-connected), i.e. the
     regional maxima whose dynamic (height above the highest saddle towards a higher or equal
     maximum, or above the background) is >= h, labelled with `scipy.ndimage.label` (8-connected).
     h_maxima keeps *equal* peaks as separate maxima whatever the saddle between them; such peaks
     are merged into one marker when the saddle lies above peak - h (they are connected through
     `d > peak - h`), so a narrow neck splits two glands iff it is at least h pixels thinner (in
     distance) than the smaller gland's peak, whether or not the two peaks tie.
  3. `skimage.segmentation.watershed(-d, markers, mask=binary, connectivity=2)` (8-connected
     flooding, so every pixel of a component with a marker is reached). The cut between two glands
     follows the distance valley (the neck); there is no watershed line, split objects touch.
  4. A component without a marker (its peak distance is < h) keeps one id of its own.

  h = 0 is off: the result is exactly `label_instances(binary)` (bit for bit). For h > 0 the ids are
  also renumbered in raster order of each instance's first pixel, so a mask where nothing splits
  gives `label_instances(binary)` too. Deterministic (no randomness; the watershed breaks ties by
  flooding order).

  Args:
    binary: bool/int[H, W]; nonzero = gland.
    h: int >= 0, the minimum dynamic of a distance maximum that makes it a gland of its own, in
      pixels of the mask as scored (GlaS: 20x, 0.62 µm/px; a length, so it scales with the
      resolution). 0 = no splitting (plain 8-connected components).

  Returns:
    int32[H, W], 0 = background, 1..K = instance ids without gaps (K >= the number of 8-connected
    components; every component keeps at least one id), in raster order of first pixels.

  Raises:
    ValueError: input not 2-D, or `h` not an integer >= 0 (bool refused); the message names `h`.
  """
  h = check_split_h(h, "split_instances: h")
  binary = np.asarray(binary)
  if binary.ndim != 2:
    raise ValueError(f"split_instances: expected a 2-D mask [H, W], got shape {binary.shape}")
  components = label_instances(binary)
  if h == 0 or not components.any():
    return components
  from skimage.morphology import h_maxima
  from skimage.segmentation import watershed

  gland = components > 0
  dist = ndimage.distance_transform_edt(gland)
  peaks, num = ndimage.label(h_maxima(dist, h, footprint=_EIGHT_CONNECTED).astype(bool),
                             structure=_EIGHT_CONNECTED)
  if num > 1:
    peaks = _merge_tied_peaks(peaks, num, dist, h)
  labels = watershed(-dist, peaks, mask=gland, connectivity=2).astype(np.int64)
  # Components without a marker (peak distance < h): their own id, after the watershed's ids.
  unreached = gland & (labels == 0)
  labels[unreached] = components[unreached].astype(np.int64) + int(labels.max(initial=0))
  return _raster_order(labels)


def _merge_tied_peaks(peaks: np.ndarray, num: int, dist: np.ndarray, h: int) -> np.ndarray:
  """Gives one id to h-maxima of equal height connected through `dist > height - h`.

  A maximum of dynamic < h that is not the highest of its region is never an h-maximum, but
  `h_maxima` keeps all of several *equal* highest ones; they are one maximum of dynamic < h when a
  path joins them above height - h. Only heights shared by two or more peaks need a labelling.
  """
  heights = np.asarray(ndimage.maximum(dist, peaks, np.arange(1, num + 1)), np.float64)
  lut = np.arange(num + 1)
  for v in np.unique(heights):
    same = np.flatnonzero(heights == v) + 1
    if len(same) < 2:
      continue
    region, _ = ndimage.label(dist > v - h, structure=_EIGHT_CONNECTED)
    first = {}
    for p in same:
      r = int(region[peaks == p][0])
      lut[p] = lut[first.setdefault(r, p)]
  return lut[peaks]


@dataclasses.dataclass
class ObjectStats:
  """Additive GlaS object statistics of one image or a pooled split.

  Sums over objects: `*_area` are Σ|S| (segmented) and Σ|G| (ground truth) in pixels; `s_dice` is
  Σ_S |S|·Dice(G*(S), S), `g_dice` is Σ_G |G|·Dice(G, S*(G)), and `s_haus` / `g_haus` the same
  with the Hausdorff distance (pixels). Adding the stats of several images and calling the
  properties gives the challenge's pooled (area-weighted over the split) metrics.
  """

  tp: int = 0
  fp: int = 0
  fn: int = 0
  num_pred: int = 0
  num_gt: int = 0
  s_area: int = 0
  g_area: int = 0
  s_dice: float = 0.0
  g_dice: float = 0.0
  s_haus: float = 0.0
  g_haus: float = 0.0

  def __add__(self, other: ObjectStats) -> ObjectStats:
    return ObjectStats(*(getattr(self, f.name) + getattr(other, f.name)
                         for f in dataclasses.fields(self)))

  @property
  def precision(self) -> float:
    return _ratio(self.tp, self.tp + self.fp)

  @property
  def recall(self) -> float:
    return _ratio(self.tp, self.tp + self.fn)

  @property
  def f1(self) -> float:
    """2·TP / (2·TP + FP + FN); 1.0 when there are no objects on either side."""
    den = 2 * self.tp + self.fp + self.fn
    return 2 * self.tp / den if den else 1.0

  def _pooled(self, s_sum: float, g_sum: float, no_objects: float) -> float:
    """0.5·(s_sum/Σ|S| + g_sum/Σ|G|), a side without objects adding 0; `no_objects` with none anywhere."""
    if self.s_area == 0 and self.g_area == 0:
      return no_objects
    s_term = s_sum / self.s_area if self.s_area else 0.0
    g_term = g_sum / self.g_area if self.g_area else 0.0
    return 0.5 * (s_term + g_term)

  @property
  def dice(self) -> float:
    """Object Dice; 1.0 with no objects anywhere, 0.0 with objects on one side only."""
    return self._pooled(self.s_dice, self.g_dice, 1.0)

  @property
  def hausdorff(self) -> float:
    """Object Hausdorff (pixels); 0.0 with no objects anywhere."""
    return self._pooled(self.s_haus, self.g_haus, 0.0)


def _relabel(instances: np.ndarray, name: str) -> tuple[np.ndarray, int]:
  """Maps arbitrary non-negative ids to 0..K (0 kept as background)."""
  instances = np.asarray(instances)
  if instances.ndim != 2:
    raise ValueError(f"{name}: expected an instance map [H, W], got shape {instances.shape}")
  if not np.issubdtype(instances.dtype, np.integer) and instances.dtype != bool:
    raise ValueError(f"{name}: expected integer instance ids, got dtype {instances.dtype}")
  if instances.size and instances.min() < 0:
    raise ValueError(f"{name}: instance ids must be >= 0 (0 = background)")
  flat = instances.astype(np.int64).ravel()
  present = np.bincount(flat, minlength=1) > 0  # ids are small (GlaS: <= 32), a table is cheap
  present[0] = True  # background keeps 0 whether or not it occurs
  lut = np.cumsum(present) - 1
  return lut[flat].reshape(instances.shape), int(lut[-1])


def _hausdorff(a: np.ndarray, b: np.ndarray) -> float:
  """Symmetric Hausdorff distance between two nonempty boolean masks of the same crop.

  Exact Euclidean distances from scipy's distance transform: the crop must contain both sets
  (nearest points then lie inside it).
  """
  to_b = ndimage.distance_transform_edt(~b)
  to_a = ndimage.distance_transform_edt(~a)
  return float(max(to_b[a].max(), to_a[b].max()))


def _union_slice(s1: tuple[slice, slice], s2: tuple[slice, slice]) -> tuple[slice, slice]:
  return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(s1, s2))


class _Objects:
  """Instance map with per-object bounding boxes, for pairwise Hausdorff distances."""

  def __init__(self, labels: np.ndarray, count: int):
    self.labels = labels
    self.count = count
    self.boxes = ndimage.find_objects(labels, max_label=count) if count else []


def _pair_hausdorff(sobj: _Objects, i: int, gobj: _Objects, j: int) -> float:
  """Hausdorff distance between segmented object i and ground-truth object j (ids from 1)."""
  box = _union_slice(sobj.boxes[i - 1], gobj.boxes[j - 1])
  return _hausdorff(sobj.labels[box] == i, gobj.labels[box] == j)


def _nearest_hausdorff(mine: _Objects, i: int, theirs: _Objects,
                       exact: Callable[[int, int], float]) -> float:
  """min over the objects j of `theirs` of H(mine_i, theirs_j) (ids from 1).

  Prunes with the lower bound H(A, B) >= max_{b in B} dist(b, A) (one distance transform of A
  over the whole image gives it for every B); `exact(i, j)` is evaluated in increasing order of
  the bound until the bound reaches the best distance found.
  """
  to_mine = ndimage.distance_transform_edt(mine.labels != i)
  bounds = np.asarray(ndimage.maximum(to_mine, theirs.labels, np.arange(1, theirs.count + 1)),
                      dtype=np.float64).reshape(-1)
  best = math.inf
  for j in np.argsort(bounds, kind="stable"):
    if bounds[j] >= best:
      break
    best = min(best, exact(i, int(j) + 1))
  return best


def object_stats(pred_instances: np.ndarray, gt_instances: np.ndarray, *,
                 unmatched: str = "diagonal") -> ObjectStats:
  """GlaS object statistics of one image (module docstring; Sirinukunwattana et al. 2017).

  Args:
    pred_instances: int[H, W] segmented objects (0 = background; e.g. `label_instances(pred)`).
    gt_instances: int[H, W] ground-truth gland ids (0 = background); ids need not be consecutive.
    unmatched: Hausdorff distance of an object whose image has no object on the other side:
      "diagonal" (sqrt((H-1)² + (W-1)²), the default) or "inf".

  Returns:
    `ObjectStats` (additive; `.f1`, `.dice`, `.hausdorff` give the image's values).

  Raises:
    ValueError: shapes differ, ids are negative / not integers, or `unmatched` is unknown.
  """
  if unmatched not in ("diagonal", "inf"):
    raise ValueError(f"object_stats: unmatched must be 'diagonal' or 'inf', got {unmatched!r}")
  s_lab, ns = _relabel(pred_instances, "pred_instances")
  g_lab, ng = _relabel(gt_instances, "gt_instances")
  if s_lab.shape != g_lab.shape:
    raise ValueError(f"object_stats: pred_instances {s_lab.shape} and gt_instances {g_lab.shape} "
                     "differ in shape")
  h, w = s_lab.shape
  missing = math.hypot(h - 1, w - 1) if unmatched == "diagonal" else math.inf

  # overlap[i, j] = |S_i ∩ G_j| for i in 0..ns, j in 0..ng (row/col 0 = background).
  overlap = np.bincount((s_lab * (ng + 1) + g_lab).ravel(),
                        minlength=(ns + 1) * (ng + 1)).reshape(ns + 1, ng + 1)
  s_area = overlap[1:, :].sum(1)  # [ns]
  g_area = overlap[:, 1:].sum(0)  # [ng]
  inter = overlap[1:, 1:]  # [ns, ng]
  stats = ObjectStats(num_pred=ns, num_gt=ng, s_area=int(s_area.sum()), g_area=int(g_area.sum()))

  # Max-overlap partners (argmax -> smallest id on ties); -1 where there is no overlap.
  s_best = np.where(inter.max(1, initial=0) > 0, inter.argmax(1) if ng else 0, -1)  # [ns]
  g_best = np.where(inter.max(0, initial=0) > 0, inter.argmax(0) if ns else 0, -1)  # [ng]

  # Detection: TP when the segment covers >= 50 % of its max-overlap ground truth.
  tp_mask = np.zeros(ns, dtype=bool)
  for i in range(ns):
    j = s_best[i]
    tp_mask[i] = j >= 0 and 2 * inter[i, j] >= g_area[j]
  matched_gt = np.zeros(ng, dtype=bool)
  matched_gt[s_best[tp_mask]] = True
  stats.tp = int(tp_mask.sum())
  stats.fp = int(ns - stats.tp)
  stats.fn = int(ng - matched_gt.sum())

  # Dice: a partner-less object scores 0.
  for i in range(ns):
    j = s_best[i]
    if j >= 0:
      stats.s_dice += float(2.0 * inter[i, j] / (s_area[i] + g_area[j]) * s_area[i])
  for j in range(ng):
    i = g_best[j]
    if i >= 0:
      stats.g_dice += float(2.0 * inter[i, j] / (s_area[i] + g_area[j]) * g_area[j])

  # Hausdorff: a partner-less object takes the nearest object of the other side (Hausdorff).
  sobj, gobj = _Objects(s_lab, ns), _Objects(g_lab, ng)
  cache: dict[tuple[int, int], float] = {}

  def dist(i: int, j: int) -> float:  # ids from 1: segmented i, ground truth j
    if (i, j) not in cache:
      cache[(i, j)] = _pair_hausdorff(sobj, i, gobj, j)
    return cache[(i, j)]

  for i in range(ns):
    if ng == 0:
      d = missing
    elif s_best[i] >= 0:
      d = dist(i + 1, s_best[i] + 1)
    else:
      d = _nearest_hausdorff(sobj, i + 1, gobj, dist)
    stats.s_haus += d * float(s_area[i])
  for j in range(ng):
    if ns == 0:
      d = missing
    elif g_best[j] >= 0:
      d = dist(g_best[j] + 1, j + 1)
    else:
      d = _nearest_hausdorff(gobj, j + 1, sobj, lambda a, b: dist(b, a))
    stats.g_haus += d * float(g_area[j])
  return stats


def object_f1(pred_instances: np.ndarray, gt_instances: np.ndarray) -> float:
  """GlaS object-level F1 of one image (detection; module docstring). Range [0, 1]."""
  return object_stats(pred_instances, gt_instances).f1


def object_dice(pred_instances: np.ndarray, gt_instances: np.ndarray) -> float:
  """GlaS object-level Dice of one image (area-weighted, both directions). Range [0, 1]."""
  return object_stats(pred_instances, gt_instances).dice


def object_hausdorff(pred_instances: np.ndarray, gt_instances: np.ndarray, *,
                     unmatched: str = "diagonal") -> float:
  """GlaS object-level Hausdorff distance of one image, in pixels (>= 0; Inf if `unmatched='inf'`
  and one side of the image is empty)."""
  return object_stats(pred_instances, gt_instances, unmatched=unmatched).hausdorff


# --------------------------------------------------------------------------------------------
# Split evaluation
# --------------------------------------------------------------------------------------------

PER_IMAGE_FIELDS = ("name", "miou", "iou_background", "iou_gland", "dice", "object_f1",
                    "object_dice", "object_hausdorff", "tp", "fp", "fn", "num_pred_objects",
                    "num_gt_objects")


@dataclasses.dataclass(frozen=True)
class ImageScore:
  """The additive metric counts of one image (`score_image`); pool several with `pool_scores`.

  conf: int64[2, 2] pixel confusion matrix (rows ground truth, columns prediction);
  objects: the image's `ObjectStats`; row: its per-image CSV row (keys `PER_IMAGE_FIELDS`).
  """

  conf: np.ndarray
  objects: ObjectStats
  row: dict[str, Any]


def score_image(pred: np.ndarray, gt: np.ndarray, name: str = "", *,
                unmatched: str = "diagonal", split_h: int = 0) -> ImageScore:
  """Pixel and object counts of one image.

  Args:
    pred: uint8/bool/int[H, W] binary prediction (0 = non-gland, 1 = gland).
    gt: int[H, W] ground-truth instance ids (0 = background, > 0 = gland id).
    name: the image name (for the row and error messages).
    unmatched: see `object_stats`.
    split_h: predicted objects are `split_instances(pred, split_h)` (pixels; 0 = the 8-connected
      components, `label_instances`). Pixel metrics do not depend on it.

  Raises:
    ValueError: shapes differ or are not 2-D, the prediction holds values other than 0/1, the
      ground truth has negative ids (the message names the image), or a bad `split_h`.
  """
  pred = np.asarray(pred)
  gt = np.asarray(gt)
  if pred.shape != gt.shape or pred.ndim != 2:
    raise ValueError(f"evaluate_split: image {name!r}: prediction {pred.shape} and ground "
                     f"truth {gt.shape} must have the same 2-D shape")
  if pred.size and (pred.min() < 0 or pred.max() > 1):
    raise ValueError(f"evaluate_split: image {name!r}: prediction must hold 0/1 "
                     f"(got range {pred.min()}..{pred.max()}); a 0/255 PNG needs `// 255`")
  if gt.size and gt.min() < 0:
    raise ValueError(f"evaluate_split: image {name!r}: negative ground-truth ids")
  split_h = check_split_h(split_h, "evaluate_split: split_h")
  pred = pred.astype(np.int64)
  c = confusion_matrix(pred, (gt > 0).astype(np.int64))
  st = object_stats(split_instances(pred, split_h), gt, unmatched=unmatched)
  pm = pixel_metrics(c)
  row = {
      "name": name, "miou": pm["miou"], "iou_background": pm["iou"][0],
      "iou_gland": pm["iou"][1], "dice": pm["dice"], "object_f1": st.f1,
      "object_dice": st.dice, "object_hausdorff": st.hausdorff, "tp": st.tp, "fp": st.fp,
      "fn": st.fn, "num_pred_objects": st.num_pred, "num_gt_objects": st.num_gt,
  }
  return ImageScore(conf=c, objects=st, row=row)


def pool_scores(scores: Sequence[ImageScore]) -> dict[str, Any]:
  """Split metrics from per-image counts: one summed confusion matrix, summed `ObjectStats`.

  Pooling the scores of test_a and test_b gives exactly the metrics of `test` (all counts add), so
  no image is scored twice. Returns the dict described in `evaluate_split`.

  Raises:
    ValueError: `scores` is empty.
  """
  if not scores:
    raise ValueError("evaluate_split: no images")
  conf = np.zeros((2, 2), np.int64)
  total = ObjectStats()
  for sc in scores:
    conf += sc.conf
    total = total + sc.objects
  return {
      "num_images": len(scores),
      "pixel": pixel_metrics(conf),
      "object": {
          "f1": total.f1, "precision": total.precision, "recall": total.recall,
          "tp": total.tp, "fp": total.fp, "fn": total.fn, "dice": total.dice,
          "hausdorff": total.hausdorff, "num_pred_objects": total.num_pred,
          "num_gt_objects": total.num_gt,
      },
      "per_image": [dict(sc.row) for sc in scores],
  }


def evaluate_split(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                   names: Sequence[str] | None = None, *,
                   unmatched: str = "diagonal", split_h: int = 0) -> dict[str, Any]:
  """Pixel and GlaS object metrics of one split (test, test_a or test_b).

  Args:
    preds: list of uint8/bool[H_k, W_k] binary predictions (0 = non-gland, 1 = gland).
    gts: list of int[H_k, W_k] ground-truth instance ids (0 = background, > 0 = gland id);
      the binary ground truth is `gt > 0`.
    names: optional image names for the per-image rows (default "0", "1", ...).
    unmatched: see `object_stats`.
    split_h: see `score_image` (0 = predicted objects are the 8-connected components).

  Returns:
    {"num_images": n,
     "pixel": `pixel_metrics` of the split-wide confusion matrix,
     "object": {"f1", "precision", "recall", "tp", "fp", "fn", "dice", "hausdorff",
                "num_pred_objects", "num_gt_objects"} pooled over the split (module docstring),
     "per_image": list of dicts with keys `PER_IMAGE_FIELDS` (per-image pixel and object values)}.

  Raises:
    ValueError: list lengths differ, the list is empty, a shape differs, or a prediction holds
      values other than 0/1 (the message names the image).
  """
  if len(preds) != len(gts):
    raise ValueError(f"evaluate_split: {len(preds)} predictions but {len(gts)} ground truths")
  if not preds:
    raise ValueError("evaluate_split: no images")
  if names is None:
    names = [str(k) for k in range(len(preds))]
  if len(names) != len(preds):
    raise ValueError(f"evaluate_split: {len(names)} names for {len(preds)} images")
  return pool_scores([score_image(p, g, n, unmatched=unmatched, split_h=split_h)
                      for n, p, g in zip(names, preds, gts)])


def per_image_csv(rows: Sequence[dict[str, Any]], fields: Sequence[str] = PER_IMAGE_FIELDS) -> str:
  """CSV text (header `fields`, default `PER_IMAGE_FIELDS`) of `evaluate_split(...)["per_image"]` rows.

  Keys of a row that are not in `fields` are left out.
  """
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore",
                          lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
  return buf.getvalue()


def write_per_image_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]],
                        fields: Sequence[str] = PER_IMAGE_FIELDS) -> None:
  """Writes `per_image_csv(rows, fields)` to `path` atomically (temp name, then rename)."""
  from oeem_jax.runtime.io_utils import atomic_write_bytes

  atomic_write_bytes(path, per_image_csv(rows, fields).encode())
