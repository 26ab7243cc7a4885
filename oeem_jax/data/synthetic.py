"""Embedded synthetic GlaS-shaped set: the default data when no GlaS folder is given.

GlaS cannot ship with the code (research-only terms), so a fresh machine runs on a small,
deterministic, procedurally drawn H&E-like set written in the same Warwick-QU layout
(`train_N.png`, `train_N_anno.png`, `testA_N…`, `testB_N…`, `Grade.csv`) and read by the same TFDS
`glas` builder. Images are 256×192 (W×H) RGB: pink stroma with scattered dark nuclei and elliptical
glands (pale lumen, purple epithelium ring with a row of dark nuclei). Benign glands are large and
regular with a wide lumen; malignant glands are smaller, irregular (radial wobble) with a narrow or
absent lumen. Masks hold gland instance ids 1..K (lumen included, as in GlaS), 0 = stroma.

IT IS NOT GlaS: every output made from it is labelled synthetic and no accuracy is ever reported on it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

GENERATOR_VERSION = 1
HEIGHT, WIDTH = 192, 256
_SEED = 20220923  # fixed: the set is a pure function of (GENERATOR_VERSION, split, index)
_SPLIT_CODE = {"train": 0, "testA": 1, "testB": 2}

_STROMA = np.array([232.0, 168.0, 208.0])
_CYTO = np.array([196.0, 118.0, 190.0])
_NUCLEUS = np.array([88.0, 42.0, 128.0])
_LUMEN = np.array([246.0, 236.0, 244.0])


def expected_counts(n_train: int, n_test: int) -> dict[str, int]:
  """Split counts of the synthetic set: test images split as ceil(n/2) testA + floor(n/2) testB."""
  return {"train": n_train, "test_a": n_test - n_test // 2, "test_b": n_test // 2}


def _paint(img: np.ndarray, region: np.ndarray, colour: np.ndarray, alpha: float | np.ndarray = 1.0):
  a = np.asarray(alpha, np.float64)
  if a.ndim:
    a = a[region][:, None]
  img[region] = (1 - a) * img[region] + a * colour


def _nuclei(img: np.ndarray, rng: np.random.Generator, centres: np.ndarray, radius: float):
  """Dark blobs (radius px) at float centres [N, 2] (y, x)."""
  h, w = img.shape[:2]
  r = int(np.ceil(radius)) + 1
  for cy, cx in centres:
    y0, y1 = max(0, int(cy) - r), min(h, int(cy) + r + 1)
    x0, x1 = max(0, int(cx) - r), min(w, int(cx) + r + 1)
    if y0 >= y1 or x0 >= x1:
      continue
    yy, xx = np.mgrid[y0:y1, x0:x1]
    rr = radius * rng.uniform(0.8, 1.2)
    d = np.hypot((yy - cy) / rr, (xx - cx) / (rr * rng.uniform(0.8, 1.3)))
    sub = img[y0:y1, x0:x1]
    region = d < 1.0
    _paint(sub, region, _NUCLEUS + rng.normal(0, 8, 3), 0.85)


def draw_example(rng: np.random.Generator, malignant: bool, h: int = HEIGHT, w: int = WIDTH
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Draws one synthetic image and its instance mask.

  Returns:
    (uint8[h, w, 3] RGB image, uint8[h, w] instance ids 0..K).
  """
  # Stroma: base colour + smooth colour noise + fine grain.
  low = ndimage.gaussian_filter(rng.normal(0, 1, (h, w, 3)), sigma=(8, 8, 0)) * 60
  img = _STROMA[None, None, :] + low
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  mask = np.zeros((h, w), np.uint8)

  # Glands. Layout: one large gland centred on a corner tile of the 112/56 grid (so some tiles are all
  # gland, as in GlaS), a stroma-only zone in the opposite corner (tiles without gland), then smaller
  # glands rejection-sampled so that none overlap each other or the stroma zone.
  n_target = rng.integers(5, 9) if malignant else rng.integers(3, 6)
  corner_y, corner_x = rng.integers(0, 2), rng.integers(0, 2)
  big_cy = 56.0 if corner_y == 0 else h - 56.0
  big_cx = 56.0 if corner_x == 0 else w - 56.0
  free_y = (h - 112, h) if corner_y == 0 else (0, 112)  # opposite corner tile: stroma only
  free_x = (w - 112, w) if corner_x == 0 else (0, 112)
  placed: list[tuple[float, float, float]] = []
  for _ in range(300):
    if len(placed) >= n_target:
      break
    wobble = (0.18 if malignant else 0.04) * (0.3 if not placed else 1.0)
    if not placed:
      a = rng.uniform(84, 96)
      b = a * rng.uniform(0.9, 1.0)
      cy, cx = big_cy, big_cx
    else:
      a = rng.uniform(14, 32) if malignant else rng.uniform(22, 45)
      b = a * rng.uniform(0.7, 1.0)
      cy = rng.uniform(0.05 * h, 0.95 * h)
      cx = rng.uniform(0.05 * w, 0.95 * w)
    reach = a * (1 + 3 * wobble)
    if any(np.hypot(cy - py, cx - px) < reach + pr + 4 for py, px, pr in placed):
      continue
    # distance from the centre to the stroma-only tile must exceed the gland's reach
    dy_free = max(free_y[0] - cy, 0.0, cy - free_y[1])
    dx_free = max(free_x[0] - cx, 0.0, cx - free_x[1])
    if placed and np.hypot(dy_free, dx_free) < reach + 2:
      continue
    placed.append((cy, cx, reach))
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    phi = np.arctan2(v, u)
    radial = 1.0 + sum(wobble * rng.uniform(0.3, 1.0) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
                       for k in (2, 3, 5))
    rho = np.hypot(u / a, v / b) / radial
    gland = (rho < 1.0) & (mask == 0)
    mask[gland] = len(placed)
    _paint(img, gland, _CYTO + rng.normal(0, 10, 3), 0.9)
    lumen_frac = rng.uniform(0.15, 0.45) if malignant else rng.uniform(0.5, 0.7)
    if not malignant or rng.uniform() < 0.7:
      _paint(img, gland & (rho < lumen_frac), _LUMEN, 0.95)
    # A row of nuclei just inside the gland border (two rows, crowded, when malignant).
    n_nuc = int(2 * np.pi * a / (4.5 if malignant else 6.5))
    for ring in ((0.82, 0.68) if malignant else (0.85,)):
      ang = np.sort(rng.uniform(0, 2 * np.pi, n_nuc))
      uu, vv = ring * a * np.cos(ang), ring * b * np.sin(ang)  # ring in gland coordinates
      ys = cy + uu * np.sin(theta) + vv * np.cos(theta)
      xs = cx + uu * np.cos(theta) - vv * np.sin(theta)
      keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
      ys, xs = ys[keep], xs[keep]
      inside = mask[ys.astype(int), xs.astype(int)] == len(placed)
      _nuclei(img, rng, np.stack([ys[inside], xs[inside]], 1), 2.2 if malignant else 1.8)

  # Sparse stromal nuclei (elongated fibroblasts look alike at this scale).
  n_str = int(h * w / 350)
  cand = np.stack([rng.uniform(0, h, n_str), rng.uniform(0, w, n_str)], 1)
  cand = cand[mask[cand[:, 0].astype(int), cand[:, 1].astype(int)] == 0]
  _nuclei(img, rng, cand, 1.5)

  img = ndimage.gaussian_filter(img, sigma=(0.7, 0.7, 0)) + rng.normal(0, 5, img.shape)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def _names(n_train: int, n_test: int) -> list[tuple[str, str, int]]:
  counts = expected_counts(n_train, n_test)
  out = []
  for prefix, n in (("train", counts["train"]), ("testA", counts["test_a"]), ("testB", counts["test_b"])):
    out += [(prefix, f"{prefix}_{i}", i) for i in range(1, n + 1)]
  return out


def _patient_grade(prefix: str, index: int) -> tuple[str, str]:
  """Two images per patient; patients alternate benign / malignant; test patients are separate."""
  base = {"train": 0, "testA": 100, "testB": 200}[prefix]
  pat = (index - 1) // 2 + 1
  return str(base + pat), ("malignant" if pat % 2 == 0 else "benign")


def write_synthetic_glas(folder: str | os.PathLike, n_train: int = 12, n_test: int = 4) -> Path:
  """Writes the synthetic set into `folder` (created; must not exist) in the Warwick-QU layout."""
  from PIL import Image

  folder = Path(folder)
  folder.mkdir(parents=True)
  rows = ["name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
  for prefix, name, idx in _names(n_train, n_test):
    pat, grade = _patient_grade(prefix, idx)
    rng = np.random.default_rng([_SEED, GENERATOR_VERSION, _SPLIT_CODE[prefix], idx])
    image, mask = draw_example(rng, malignant=grade == "malignant")
    Image.fromarray(image).save(folder / f"{name}.png")
    Image.fromarray(mask).save(folder / f"{name}_anno.png")
    rows.append(f"{name},{pat}, {grade}, synthetic")
  (folder / "Grade.csv").write_text("\n".join(rows) + "\n")
  (folder / "README.txt").write_text(
      "SYNTHETIC GlaS-shaped data drawn by oeem_jax.data.synthetic (not GlaS; never report accuracy on it).\n")
  return folder


def ensure_synthetic_glas(cache_root: str | os.PathLike, n_train: int = 12, n_test: int = 4) -> Path:
  """Returns the folder of the synthetic set under `cache_root/synthetic/`, drawing it if absent.

  Written into a temporary folder and renamed, so a crash never leaves a half-written set.

  Raises:
    ValueError: n_train < 1 or n_test < 0.
  """
  if n_train < 1 or n_test < 0:
    raise ValueError(f"config keys data.synthetic_train/test must be >= 1 / >= 0, got {n_train}/{n_test}")
  root = Path(cache_root).expanduser() / "synthetic"
  folder = root / f"glas-synthetic-v{GENERATOR_VERSION}-{n_train}-{n_test}"
  if (folder / "Grade.csv").is_file():
    return folder
  root.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
  try:
    write_synthetic_glas(tmp / "set", n_train, n_test)
    try:
      os.replace(tmp / "set", folder)
    except OSError:
      if not (folder / "Grade.csv").is_file():  # lost a race with another writer: fine if it finished
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return folder
