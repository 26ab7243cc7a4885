"""GlaS (Warwick-QU) source folder: scanning, input checks and decoding (no TFDS, no TensorFlow).

Source folder layout (the TFDS "manual_dir"; the official download or the lossless PNG copy):

    Grade.csv                    name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)
    train_1.bmp|png   train_1_anno.bmp|png      … train_85     (85 images)
    testA_1.bmp|png   testA_1_anno.bmp|png      … testA_60     (60 images)
    testB_1.bmp|png   testB_1_anno.bmp|png      … testB_20     (20 images)

(Sirinukunwattana et al., "Gland segmentation in colon histology images: The GlaS challenge contest",
Medical Image Analysis 35:489-502, 2017.) Other files in the folder (README, checksums, …) are ignored.
File extensions are matched case-insensitively.

Input checking (`scan_source`): every problem raises `GlasDataError` naming the file and what was
expected: missing folder or Grade.csv; image without mask or mask without image; an image missing from
Grade.csv; the same name as both .bmp and .png; unreadable or truncated file; image/mask size mismatch;
a mask with channels (RGB/RGBA/LA…) or a mask mode other than 8-bit gray / palette indices / 1-bit;
unexpected split counts (85/60/20) unless `allow_partial`.
Accepted with a warning (logged, and appended to the caller's `notes`): Grade.csv rows that name no
image; a mask that looks binary (its only non-zero value is 255, or it covers several separate
regions), whose gland instances are then derived as its 8-connected components
(`binary_to_instances`) instead of merging every gland into one object.
Image colour modes: RGB is used as is. Grayscale (L, LA, 1), palette (P/PA) and RGBA images are
CONVERTED to RGB with a warning (alpha is dropped, gray is replicated to 3 channels); any other mode
(16-bit, float, CMYK, …) is refused.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import os
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from absl import logging

from oeem_jax.errors import GlasDataError

# Order of the TFDS splits generated from the three GlaS name prefixes.
SPLIT_PREFIXES = {"train": "train", "test_a": "testA", "test_b": "testB"}
PREFIX_TO_SPLIT = {v: k for k, v in SPLIT_PREFIXES.items()}
EXPECTED_COUNTS = {"train": 85, "test_a": 60, "test_b": 20}
GRADES = ("benign", "malignant")
IMAGE_SUFFIXES = (".png", ".bmp")

_FILE_RE = re.compile(r"^(train|testA|testB)_(\d+)(_anno)?\.(png|bmp)$", re.IGNORECASE)
_CANON_PREFIX = {"train": "train", "testa": "testA", "testb": "testB"}


@dataclasses.dataclass
class Example:
  """One GlaS image in memory.

  Attributes:
    name: e.g. "train_1", "testA_12".
    image: uint8[H, W, 3] RGB.
    mask: uint8[H, W] gland instance ids, 0 = background (use `mask > 0` for the binary mask).
    grade: "benign" or "malignant" (Grade.csv, GlaS grade).
    patient: Grade.csv `patient ID` (text).
  """
  name: str
  image: np.ndarray
  mask: np.ndarray
  grade: str
  patient: str


@dataclasses.dataclass
class SourceRecord:
  """One image/mask pair found in a source folder (not decoded).

  Attributes:
    name: e.g. "train_1".
    split: "train", "test_a" or "test_b".
    image_path, mask_path: the files (.bmp or .png).
    grade, patient: from Grade.csv.
  """
  name: str
  split: str  # train | test_a | test_b
  image_path: Path
  mask_path: Path
  grade: str
  patient: str



def natural_key(name: str) -> tuple:
  """Sort key of an image name: split prefix order (train, testA, testB), then the number.

  Returns:
    a tuple ordering train_2 before train_10 and every train_* before testA_*; names of another form
    sort after all GlaS names, alphabetically.
  """
  m = re.match(r"^(train|testA|testB)_(\d+)$", name)
  if not m:
    return (9, name, 0)
  return (list(SPLIT_PREFIXES.values()).index(m.group(1)), "", int(m.group(2)))



def read_grades(csv_path: Path) -> dict[str, tuple[str, str]]:
  """Parses Grade.csv into {name: (patient_id, grade)}.

  The header must contain `name`, `patient ID` and `grade (GlaS)` (spaces around names ignored);
  grades must be benign/malignant (case-insensitive).

  Raises:
    GlasDataError: missing/unreadable file, missing column, bad grade, duplicate name.
  """
  if not csv_path.is_file():
    raise GlasDataError(f"{csv_path}: Grade.csv not found; expected the GlaS Grade.csv "
                        "(columns: name, patient ID, grade (GlaS), ...) in the data folder")
  try:
    text = csv_path.read_text(encoding="utf-8-sig")
  except (OSError, UnicodeDecodeError) as e:
    raise GlasDataError(f"{csv_path}: cannot read Grade.csv ({e})") from e
  rows = list(csv.reader(io.StringIO(text)))
  if not rows:
    raise GlasDataError(f"{csv_path}: empty file; expected a header and one row per image")
  header = [h.strip().lower() for h in rows[0]]
  try:
    i_name, i_pat, i_grade = header.index("name"), header.index("patient id"), header.index("grade (glas)")
  except ValueError as e:
    raise GlasDataError(f"{csv_path}: header {rows[0]} lacks one of the columns 'name', 'patient ID', "
                        "'grade (GlaS)'") from e
  out: dict[str, tuple[str, str]] = {}
  for lineno, row in enumerate(rows[1:], start=2):
    if not any(c.strip() for c in row):
      continue
    if len(row) <= max(i_name, i_pat, i_grade):
      raise GlasDataError(f"{csv_path}:{lineno}: expected at least {max(i_name, i_pat, i_grade) + 1} "
                          f"columns, got {row}")
    name, pat, grade = row[i_name].strip(), row[i_pat].strip(), row[i_grade].strip().lower()
    if grade not in GRADES:
      raise GlasDataError(f"{csv_path}:{lineno}: grade {row[i_grade]!r} for {name}; expected benign or "
                          "malignant")
    if name in out:
      raise GlasDataError(f"{csv_path}:{lineno}: duplicate row for {name}")
    out[name] = (pat, grade)
  return out


def list_source(folder: str | os.PathLike, notes: list[str] | None = None) -> list[SourceRecord]:
  """Pairs images with masks and Grade.csv rows in a Warwick-QU folder (no decoding).

  Grade.csv rows that name no image in the folder are accepted with a warning (appended to `notes`
  when given): the official Grade.csv lists all 165 images, so a row without its image usually
  means a file went missing.

  Returns:
    SourceRecords sorted by natural name order.

  Raises:
    GlasDataError: missing folder, image without mask (or the reverse), name as both .bmp and .png,
      image missing from Grade.csv, or no GlaS images at all.
  """
  folder = Path(folder).expanduser()
  if not folder.is_dir():
    raise GlasDataError(
        f"{folder}: data folder not found; expected a GlaS (Warwick-QU) folder with train_N.bmp|png, "
        "train_N_anno.bmp|png, testA_*, testB_* and Grade.csv. Pass it with --config.data.dir=/path/to/glas, "
        "or leave data.dir empty for the small synthetic stand-in set.")
  images: dict[str, Path] = {}
  masks: dict[str, Path] = {}
  for p in sorted(folder.iterdir()):
    m = _FILE_RE.match(p.name)
    if not m or not p.is_file():
      continue
    name = f"{_CANON_PREFIX[m.group(1).lower()]}_{int(m.group(2))}"
    target = masks if m.group(3) else images
    if name in target:
      raise GlasDataError(f"{p}: {name}{m.group(3) or ''} exists twice ({target[name].name} and {p.name}); "
                          "expected exactly one .bmp or .png file per image and per mask")
    target[name] = p
  if not images and not masks:
    raise GlasDataError(f"{folder}: no GlaS images found; expected files named train_N.bmp|png, "
                        "testA_N.bmp|png, testB_N.bmp|png with masks <name>_anno.bmp|png")
  for name in sorted(set(images) - set(masks), key=natural_key):
    raise GlasDataError(f"{images[name]}: image without mask; expected {folder / (name + '_anno' + images[name].suffix)}")
  for name in sorted(set(masks) - set(images), key=natural_key):
    raise GlasDataError(f"{masks[name]}: mask without image; expected {folder / (name + masks[name].suffix)}")
  grades = read_grades(folder / "Grade.csv")
  orphans = sorted(set(grades) - set(images), key=natural_key)
  if orphans:
    shown = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
    msg = (f"{folder / 'Grade.csv'}: {len(orphans)} row(s) name no image in the folder ({shown}); "
           "those rows are ignored")
    logging.warning("%s", msg)
    if notes is not None:
      notes.append(msg)
  records = []
  for name in sorted(images, key=natural_key):
    if name not in grades:
      raise GlasDataError(f"{folder / 'Grade.csv'}: no row for {name} ({images[name].name}); expected one "
                          "row per image with its patient ID and grade")
    pat, grade = grades[name]
    records.append(SourceRecord(name, PREFIX_TO_SPLIT[name.split("_")[0]], images[name], masks[name],
                                grade, pat))
  return records


def check_counts(records: Sequence[SourceRecord], folder: str | os.PathLike,
                 expected: Mapping[str, int] = EXPECTED_COUNTS, allow_partial: bool = False) -> dict[str, int]:
  """Checks the per-split image counts.

  Returns:
    {split: count} for train, test_a, test_b.

  Raises:
    GlasDataError: counts differ from `expected` and `allow_partial` is False.
  """
  counts = {s: sum(r.split == s for r in records) for s in SPLIT_PREFIXES}
  if counts != dict(expected):
    msg = (f"{folder}: found {counts['train']} train, {counts['test_a']} testA and {counts['test_b']} testB "
           f"images; expected {expected['train']}/{expected['test_a']}/{expected['test_b']}")
    if not allow_partial:
      raise GlasDataError(msg + ". Set --config.data.allow_partial=True to use a partial set.")
    logging.warning("%s (allowed by data.allow_partial)", msg)
  return counts


def _open(path: Path):
  from PIL import Image
  try:
    img = Image.open(path)
    img.load()  # full decode: catches truncated / corrupt pixel data
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, … for bad files
    raise GlasDataError(f"{path}: unreadable or truncated image file ({type(e).__name__}: {e}); "
                        "expected a complete 8-bit .png or .bmp") from e
  return img


_CONVERT_MODES = ("L", "LA", "1", "P", "PA", "RGBA")


def decode_image(path: str | os.PathLike, notes: list[str] | None = None, warn: bool = True) -> np.ndarray:
  """Reads an H&E image as uint8[H, W, 3] RGB.

  Gray (L, LA, 1), palette (P, PA) and RGBA images are converted to RGB with a warning (appended to
  `notes` when given; `warn=False` silences it); other modes are refused.

  Raises:
    GlasDataError: unreadable/truncated file or unsupported colour mode.
  """
  path = Path(path)
  img = _open(path)
  if img.mode != "RGB":
    if img.mode not in _CONVERT_MODES:
      raise GlasDataError(f"{path}: image colour mode {img.mode!r} is not supported; expected 8-bit RGB "
                          "(gray, palette and RGBA are converted)")
    msg = f"{path}: image mode {img.mode} converted to RGB" + (" (alpha dropped)" if "A" in img.mode else "")
    if warn:
      logging.warning("%s", msg)
      warnings.warn(msg, stacklevel=2)
    if notes is not None:
      notes.append(msg)
    img = img.convert("RGB")
  return np.asarray(img, dtype=np.uint8)


_EIGHT_CONNECTED = np.ones((3, 3), bool)


def binary_to_instances(mask: np.ndarray, path: str | os.PathLike = "mask") -> tuple[np.ndarray, str | None]:
  """Gland instances of a mask that looks binary; other masks come back unchanged.

  A mask looks binary when a single non-zero value covers every gland pixel and that value is 255
  (a 0/255 export) or covers several separate regions (a 0/1 export of several glands). GlaS
  annotations give every gland its own id, and no real GlaS mask has an id with two separate
  regions (3 of its 165 masks hold one gland with id 1, which stays as it is). Such a mask would merge
  every gland of the image into one object and corrupt the object F1, Dice and Hausdorff, so its
  instances are derived as its 8-connected components (scipy.ndimage.label), numbered in raster order.

  Args:
    mask: uint8[H, W].
    path: file name for the message.

  Returns:
    (uint8[H, W] instance ids, a note naming the file and what was done, or None when unchanged).

  Raises:
    GlasDataError: a binary mask with more than 255 separate regions (ids would not fit in uint8).
  """
  from scipy import ndimage

  values = np.unique(mask)
  nonzero = values[values != 0]
  if nonzero.size != 1:
    return mask, None
  value = int(nonzero[0])
  labels, count = ndimage.label(mask != 0, structure=_EIGHT_CONNECTED)
  if value != 255 and count < 2:
    return mask, None
  if count > 255:
    raise GlasDataError(f"{path}: binary mask (only value {value}) with {count} separate regions; expected "
                        "at most 255 glands (instance ids are uint8)")
  note = (f"{path}: mask looks binary (its only non-zero value {value} covers {count} separate "
          f"region(s)); gland instances derived as its {count} 8-connected component(s)")
  return labels.astype(np.uint8), note


def decode_mask(path: str | os.PathLike, notes: list[str] | None = None, warn: bool = True) -> np.ndarray:
  """Reads an instance mask as uint8[H, W] (0 = background, 1..K gland ids).

  Accepted modes: L (8-bit gray), P (palette indices are the ids, as in the official 8-bit BMPs),
  1 (bilevel, 0/1), and I/I;16 when every value fits in 0..255. A mask that looks binary (0/255, or
  one id covering several separate regions) gets instance ids from its connected components, with
  a warning naming the file (appended to `notes` when given; `warn=False` silences it):
  `binary_to_instances`.

  Raises:
    GlasDataError: unreadable/truncated file, a mask with channels, values above 255, or a binary
      mask with more than 255 regions.
  """
  path = Path(path)
  img = _open(path)
  if img.mode in ("L", "P", "1"):
    arr = np.asarray(img, dtype=np.uint8)
  elif img.mode.startswith("I"):
    arr = np.asarray(img)
    if not (arr.ndim == 2 and arr.min() >= 0 and arr.max() <= 255):
      raise GlasDataError(f"{path}: mask values span {arr.min()}..{arr.max()}; expected instance ids 0..255")
    arr = arr.astype(np.uint8)
  else:
    raise GlasDataError(f"{path}: mask has mode {img.mode} with {len(img.getbands())} channels; expected a "
                        "single-channel instance-id mask (8-bit gray or palette, 0 = background)")
  arr, note = binary_to_instances(arr, path)
  if note:
    if warn:
      logging.warning("%s", note)
    if notes is not None:
      notes.append(note)
  return arr


def png_kind(path: Path) -> tuple[int, int] | None:
  """The PNG header of a file, to store 8-bit PNGs byte for byte.

  Args:
    path: any file; only names ending in .png (any case) are opened.

  Returns:
    (bit depth, colour type) from the IHDR chunk (e.g. (8, 2) = 8-bit RGB, (8, 0) = 8-bit gray), or None
    when the name does not end in .png or the file does not start with a PNG signature and IHDR.

  Raises:
    OSError: the file cannot be read.
  """
  if path.suffix.lower() != ".png":
    return None
  with open(path, "rb") as f:
    head = f.read(26)
  if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
    return None
  return head[24], head[25]


def validate_records(records: Sequence[SourceRecord], notes: list[str] | None = None) -> dict[str, tuple[int, int]]:
  """Decodes every image and mask fully and checks modes and sizes.

  Returns:
    {name: (height, width)}.

  Raises:
    GlasDataError: the first bad file (see `decode_image`, `decode_mask`), or image/mask size mismatch.
  """
  def check(r: SourceRecord) -> tuple[tuple[int, int], list[str]]:
    local: list[str] = []
    image = decode_image(r.image_path, local)
    mask = decode_mask(r.mask_path, local)
    if image.shape[:2] != mask.shape:
      raise GlasDataError(f"{r.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                          f"{r.image_path.name} is {image.shape[1]}x{image.shape[0]}; expected equal sizes")
    return image.shape[:2], local

  sizes = {}
  # PIL decodes without the GIL: a few threads; results (and the first error) come in file order.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
    for r, (size, local) in zip(records, pool.map(check, records)):
      sizes[r.name] = size
      if notes is not None:
        notes.extend(local)
  return sizes


def scan_source(folder: str | os.PathLike, *, expected: Mapping[str, int] = EXPECTED_COUNTS,
                allow_partial: bool = False, decode: bool = True,
                notes: list[str] | None = None) -> list[SourceRecord]:
  """All checks on a source folder: pairing, Grade.csv, counts, and (if `decode`) every file's pixels.

  Args:
    folder: the GlaS source folder.
    expected: {split: image count} for train, test_a, test_b.
    allow_partial: accept other counts (a warning is logged).
    decode: also decode every image and mask fully (`validate_records`).
    notes: list that receives the warnings (Grade.csv rows without an image, colour conversions,
      binary masks).

  Returns:
    the folder's `SourceRecord`s in natural name order.

  Raises:
    GlasDataError: see the module docstring.
  """
  records = list_source(folder, notes)
  check_counts(records, folder, expected, allow_partial)
  if decode:
    validate_records(records, notes)
  return records

