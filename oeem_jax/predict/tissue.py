"""Tissue detection on a low-resolution thumbnail: which parts of a slide are worth predicting.

Half of a whole slide is usually glass. `tissue_mask` finds the tissue on a thumbnail (about
`THUMBNAIL_MPP` µm per pixel: a 1-gigapixel slide at 0.5 µm/px is ~2,000 × 1,000 px there) so that
prediction can skip every sliding window that lies on glass (`WindowFilter`).

The rule. H&E stains tissue pink to purple; glass is near-white and near-grey. The tissue score of a
thumbnail pixel is its HSV saturation, (max - min) / max of R, G, B. The threshold is Otsu's on the
thumbnail's saturation (`skimage.filters.threshold_otsu`), clamped to [`min_threshold`,
`max_threshold`]: on a slide with glass Otsu separates glass (saturation 0.00-0.04) from tissue (0.2-0.7)
and the upper clamp keeps pale tissue in; on an image that is all tissue (a GlaS field, saturation
quartiles 0.04 / 0.09 / 0.3 / 0.6 on the palest ones) Otsu would split the tissue itself, and the
clamp keeps the threshold in the glass range. Very dark pixels (max of R, G, B below `dark_value`:
pen marks, scanner borders) are never tissue. The mask is then cleaned as eval cleans gland masks
(`fill_enclosed_holes`, `oeem_jax.evaluation.inference.remove_small_regions`): enclosed holes up to
`max_hole_area_um2` (gland lumens, fat) are filled and components smaller than `min_object_area_um2`
(dust, specks) dropped; areas are in µm², so the rule does not depend on the thumbnail's size.

`WindowFilter` answers, for a window of the network's sliding-window grid at any scale, whether the
tissue mask (dilated by `margin` input pixels) touches it; prediction fills skipped windows with the
non-gland class. With no tissue anywhere, nothing is predicted and the result is empty.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# µm per pixel of the tissue-detection thumbnail (1/16 of a 0.5 µm/px scan).
THUMBNAIL_MPP = 8.0
# Threshold clamp on HSV saturation (0..1); see the module docstring.
MIN_THRESHOLD = 0.05
MAX_THRESHOLD = 0.12
# max(R, G, B) below this (0..255) is not tissue: pen ink, black scanner borders.
DARK_VALUE = 40
# Cleaning, in µm²: components under MIN_OBJECT_AREA_UM2 dropped (about a 100 µm square),
# holes under MAX_HOLE_AREA_UM2 filled (about a 400 µm square: lumens, fat, tears).
MIN_OBJECT_AREA_UM2 = 1.0e4
MAX_HOLE_AREA_UM2 = 1.6e5


@dataclasses.dataclass(frozen=True)
class TissueMask:
  """Tissue on a thumbnail.

  Attributes:
    mask: bool[h, w], True = tissue, on the thumbnail grid.
    downsample: input pixels per thumbnail pixel along each axis (y, x), >= 1: thumbnail pixel
      (i, j) covers input rows [i * dy, (i + 1) * dy) and columns [j * dx, (j + 1) * dx).
    threshold: the saturation threshold used (0..1).
    otsu: Otsu's threshold before clamping (nan for a constant thumbnail).
    fraction: tissue fraction of the thumbnail's pixels (0..1).
  """
  mask: np.ndarray
  downsample: tuple[float, float]
  threshold: float
  otsu: float
  fraction: float

  def record(self) -> dict:
    """JSON-ready summary (for a prediction record)."""
    return {"fraction": round(self.fraction, 6), "threshold": round(self.threshold, 4),
            "otsu": None if math.isnan(self.otsu) else round(self.otsu, 4),
            "thumbnail_size": [int(self.mask.shape[1]), int(self.mask.shape[0])],
            "downsample": [round(self.downsample[1], 4), round(self.downsample[0], 4)]}


def thumbnail_factor(mpp: float | None) -> int:
  """Integer downsampling from an input of `mpp` µm/px to about `THUMBNAIL_MPP` (>= 1); an unknown
  pixel size is taken as 0.5 µm/px (a 20x scan)."""
  return max(1, int(round(THUMBNAIL_MPP / (mpp or 0.5))))


def read_thumbnail(read, height: int, width: int, factor: int,
                   max_strip_bytes: int = 64 * 2**20) -> np.ndarray:
  """Block-mean thumbnail of an image read in strips of rows (memory: one strip).

  Args:
    read: (y0, y1, x0, x1) -> uint8[y1 - y0, x1 - x0, 3] RGB (`ImageSource.read`).
    height, width: the image's size (px).
    factor: block side (px, >= 1).
    max_strip_bytes: the largest strip read at once.

  Returns:
    uint8[ceil(height / factor), ceil(width / factor), 3]: each pixel the rounded mean of its
    block (blocks at the bottom and right border may be partial).

  Raises:
    ValueError: factor < 1.
  """
  if factor < 1:
    raise ValueError(f"read_thumbnail: factor {factor} must be >= 1")
  th, tw = -(-height // factor), -(-width // factor)
  out = np.empty((th, tw, 3), np.uint8)
  rows = max(1, min(th, max_strip_bytes // max(1, factor * factor * tw * 3)))
  col_starts = np.arange(0, width, factor)
  col_counts = np.diff(np.append(col_starts, width))
  for ty in range(0, th, rows):
    ty1 = min(th, ty + rows)
    strip = read(ty * factor, min(height, ty1 * factor), 0, width).astype(np.float64)
    row_starts = np.arange(0, strip.shape[0], factor)
    row_counts = np.diff(np.append(row_starts, strip.shape[0]))
    sums = np.add.reduceat(np.add.reduceat(strip, row_starts, axis=0), col_starts, axis=1)
    out[ty:ty1] = np.clip(np.rint(sums / (row_counts[:, None, None] * col_counts[None, :, None])),
                          0, 255)
  return out


def saturation(rgb: np.ndarray) -> np.ndarray:
  """HSV saturation of an RGB image.

  Args:
    rgb: uint8[h, w, 3].

  Returns:
    float32[h, w] in [0, 1]: (max - min) / max over R, G, B (0 where max is 0).
  """
  a = np.asarray(rgb)
  mx = a.max(axis=-1).astype(np.float32)
  mn = a.min(axis=-1).astype(np.float32)
  return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)


def tissue_mask(thumbnail: np.ndarray, *, downsample: tuple[float, float] = (1.0, 1.0),
                mpp: float | None = None, min_threshold: float = MIN_THRESHOLD,
                max_threshold: float = MAX_THRESHOLD, dark_value: int = DARK_VALUE,
                min_object_area_um2: float = MIN_OBJECT_AREA_UM2,
                max_hole_area_um2: float = MAX_HOLE_AREA_UM2) -> TissueMask:
  """Tissue mask of a thumbnail (the rule in the module docstring).

  Args:
    thumbnail: uint8[h, w, 3] RGB, a downsampled view of the whole image.
    downsample: input pixels per thumbnail pixel (y, x), each >= 1.
    mpp: µm per pixel of the input (full resolution), or None when unknown: the areas are then
      taken at `THUMBNAIL_MPP` µm per thumbnail pixel.
    min_threshold, max_threshold: clamp of the saturation threshold, 0 <= min <= max <= 1.
    dark_value: max(R, G, B) below this is not tissue (0..255; 0 = off).
    min_object_area_um2, max_hole_area_um2: cleaning areas (µm², >= 0; 0 = off).

  Returns:
    `TissueMask`.

  Raises:
    ValueError: a thumbnail that is not uint8[h, w, 3] or is empty, or an argument out of range.
  """
  from skimage.filters import threshold_otsu

  from oeem_jax.evaluation.inference import remove_small_regions

  a = np.asarray(thumbnail)
  if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8 or a.shape[0] < 1 or a.shape[1] < 1:
    raise ValueError(f"tissue_mask: expected a thumbnail uint8[h, w, 3], got {a.dtype}{list(a.shape)}")
  dy, dx = (float(d) for d in downsample)
  if dy < 1 or dx < 1:
    raise ValueError(f"tissue_mask: downsample {downsample} must be >= 1 on both axes")
  if not 0 <= min_threshold <= max_threshold <= 1:
    raise ValueError(f"tissue_mask: thresholds must satisfy 0 <= min {min_threshold} <= max "
                     f"{max_threshold} <= 1")
  if min_object_area_um2 < 0 or max_hole_area_um2 < 0:
    raise ValueError("tissue_mask: areas must be >= 0")
  sat = saturation(a)
  try:
    otsu = float(threshold_otsu(sat)) if sat.max() > sat.min() else float("nan")
  except ValueError:
    otsu = float("nan")
  threshold = min_threshold if math.isnan(otsu) else min(max(otsu, min_threshold), max_threshold)
  mask = sat > threshold
  if dark_value > 0:
    mask &= a.max(axis=-1) >= dark_value
  # Thumbnail pixel area in µm².
  px_um2 = (mpp * dy) * (mpp * dx) if mpp else THUMBNAIL_MPP ** 2
  mask = fill_enclosed_holes(mask, int(max_hole_area_um2 / px_um2))
  mask = remove_small_regions(mask, min_object_area=int(min_object_area_um2 / px_um2)) > 0
  return TissueMask(mask=mask, downsample=(dy, dx), threshold=float(threshold), otsu=otsu,
                    fraction=float(mask.mean()))


def fill_enclosed_holes(mask: np.ndarray, max_area: int) -> np.ndarray:
  """Fills the holes of a mask that no border touches and that have at most `max_area` pixels.

  Unlike `skimage.morphology.remove_small_holes`, background touching the image border is never a
  hole (on an all-glass thumbnail it would otherwise be "filled").

  Args:
    mask: bool[h, w].
    max_area: largest hole filled (px; <= 0 fills none).

  Returns:
    bool[h, w].
  """
  from scipy import ndimage

  mask = np.asarray(mask, bool)
  if max_area <= 0:
    return mask
  holes = ndimage.binary_fill_holes(mask) & ~mask  # 4-connected background not reaching the border
  labels, n = ndimage.label(holes)
  if n == 0:
    return mask
  sizes = np.bincount(labels.ravel())
  small = sizes <= max_area
  small[0] = False
  return mask | small[labels]


class WindowFilter:
  """Whether a window of input pixels touches tissue, in O(1) per window.

  Args:
    tissue: a `TissueMask` of the whole input image.
    height, width: the input image's size (px).
    margin: input pixels added around every tissue pixel (>= 0): a window within `margin` of
      tissue still runs, so the network sees the tissue's context as it would without detection.
  """

  def __init__(self, tissue: TissueMask, height: int, width: int, margin: int = 0):
    self.tissue = tissue
    self.height, self.width = int(height), int(width)
    self.margin = max(0, int(margin))
    m = np.asarray(tissue.mask, bool)
    # Summed-area table with a zero row and column in front: sat[i, j] = tissue pixels in m[:i, :j].
    self._sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
    self._sat[1:, 1:] = m.cumsum(0).cumsum(1)

  def any_tissue(self, y0: float, y1: float, x0: float, x1: float) -> bool:
    """Whether tissue (dilated by `margin`) lies in input rows [y0, y1), columns [x0, x1)."""
    dy, dx = self.tissue.downsample
    h, w = self.tissue.mask.shape
    i0 = max(0, min(h, int(math.floor((y0 - self.margin) / dy))))
    i1 = max(0, min(h, int(math.ceil((y1 + self.margin) / dy))))
    j0 = max(0, min(w, int(math.floor((x0 - self.margin) / dx))))
    j1 = max(0, min(w, int(math.ceil((x1 + self.margin) / dx))))
    if i1 <= i0 or j1 <= j0:
      return False
    s = self._sat
    return bool(s[i1, j1] - s[i0, j1] - s[i1, j0] + s[i0, j0] > 0)
