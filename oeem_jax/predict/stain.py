"""Stain sanity check: do an input's colours look like the H&E images the segmenter was trained on?

Feature of an image: the mean hematoxylin, eosin and DAB optical densities of its tissue pixels,
from `skimage.color.rgb2hed` (Ruifrok & Johnston colour deconvolution with skimage's fixed H&E-DAB
stain matrix). Tissue = pixels whose optical density summed over R, G, B
(−log10((I + 1) / 256) per channel) exceeds `TISSUE_OD` (white background and lumen excluded).
Every second pixel in each direction is used (`STEP`), at even coordinates, so a region-by-region
accumulation over an image gives exactly the feature of the whole image.

Why these and not mean/std in RGB or Lab: the three deconvolved channels separate what matters
here: an H&E image has eosin and next to no DAB, an immunohistochemistry (DAB + hematoxylin) image
has DAB and no eosin, whatever the overall brightness. Measured (docs/predict.md): over the 85 GlaS
training images the per-image features have mean (0.0297, 0.0483, 0.0127) and std (0.0064, 0.0172,
0.0040); the 80 GlaS test images stay within 3.5 std on every channel; skimage's IHC colon image
(`skimage.data.immunohistochemistry`) is 16.6 std off on DAB.

Reference: the mean and std over the training images of the per-image features (`reference`),
stored in the model folder. An input is flagged when any channel is more than `z_max` reference stds
(std floored at `STD_FLOOR`) from the reference mean, or when it has almost no tissue.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

TISSUE_OD = 0.3
STEP = 2
STD_FLOOR = 0.004
MIN_TISSUE_FRACTION = 0.01
CHANNELS = ("hematoxylin", "eosin", "dab")
WARNING = "colours differ from the H&E training images; predictions may be unreliable"
METHOD = (f"skimage.color.rgb2hed mean H, E, DAB optical density over tissue pixels (RGB optical "
          f"density sum > {TISSUE_OD}), every {STEP}nd pixel; per-image features, mean and std over "
          "the training images")


class Accumulator:
  """Sums of the stain feature over parts of one image (`add`), then `result()`."""

  def __init__(self):
    self.sum = np.zeros(3, np.float64)
    self.tissue = 0
    self.total = 0

  def add(self, part: np.ndarray, y0: int = 0, x0: int = 0) -> None:
    """Adds the pixels of `part` (uint8[h, w, 3] RGB whose top-left pixel is (y0, x0) of the image)
    that lie on the sampling grid (even global coordinates)."""
    from skimage.color import rgb2hed

    sub = np.asarray(part)[(-y0) % STEP::STEP, (-x0) % STEP::STEP]
    if sub.size == 0:
      return
    od = -np.log10((sub.astype(np.float32) + 1.0) / 256.0).sum(-1)
    tissue = od > TISSUE_OD
    self.total += tissue.size
    n = int(tissue.sum())
    if n:
      self.sum += rgb2hed(sub[tissue][None])[0].sum(0)
      self.tissue += n

  def result(self) -> tuple[np.ndarray, float]:
    """(float64[3] mean H, E, DAB over tissue pixels (zeros when none), tissue fraction in [0, 1])."""
    mean = self.sum / self.tissue if self.tissue else np.zeros(3)
    return mean, self.tissue / max(self.total, 1)


def features(image: np.ndarray) -> tuple[np.ndarray, float]:
  """The stain feature of a whole uint8[H, W, 3] RGB image: (float64[3] mean H, E, DAB optical
  density over tissue pixels, tissue fraction in [0, 1])."""
  acc = Accumulator()
  acc.add(image)
  return acc.result()


def reference(images: Iterable[np.ndarray]) -> dict[str, Any]:
  """Reference statistics of training images (each uint8[H, W, 3] RGB).

  Returns:
    {"method", "channels", "mean": [3], "std": [3] (across images), "num_images"}.

  Raises:
    ValueError: no image with tissue.
  """
  feats = [f for f, frac in (features(im) for im in images) if frac > 0]
  if not feats:
    raise ValueError("stain reference: no training image has tissue pixels")
  f = np.asarray(feats)
  return {"method": METHOD, "channels": list(CHANNELS), "mean": f.mean(0).tolist(),
          "std": f.std(0).tolist(), "num_images": len(feats)}


def compare(feature: np.ndarray, tissue_fraction: float, ref: dict[str, Any] | None,
            z_max: float) -> dict[str, Any]:
  """Compares an image's feature with the reference.

  Returns:
    {"checked": bool, "flagged": bool, "message": str, "features": [3], "tissue_fraction",
     "z": [3] or None (signed deviations in reference stds), "max_abs_z"}; `flagged` with
    `message` = `WARNING` when any |z| > z_max, or a note when the image has almost no tissue.
  """
  out: dict[str, Any] = {"features": [float(v) for v in feature],
                         "tissue_fraction": float(tissue_fraction), "z": None, "max_abs_z": None}
  if ref is None:
    return {**out, "checked": False, "flagged": False,
            "message": "no stain reference in the model: colour check skipped"}
  if tissue_fraction < MIN_TISSUE_FRACTION:
    return {**out, "checked": True, "flagged": True,
            "message": f"almost no tissue (optical density > {TISSUE_OD} on "
                       f"{100 * tissue_fraction:.2f} % of the pixels); {WARNING}"}
  std = np.maximum(np.asarray(ref["std"], np.float64), STD_FLOOR)
  z = (np.asarray(feature, np.float64) - np.asarray(ref["mean"], np.float64)) / std
  max_abs = float(np.abs(z).max())
  flagged = max_abs > z_max
  worst = CHANNELS[int(np.abs(z).argmax())]
  msg = (f"{WARNING} ({worst} {z[int(np.abs(z).argmax())]:+.1f} std from the training mean; "
         f"limit {z_max:g})") if flagged else ""
  return {**out, "checked": True, "flagged": bool(flagged), "message": msg,
          "z": [float(v) for v in z], "max_abs_z": max_abs}
