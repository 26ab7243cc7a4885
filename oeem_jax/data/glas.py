"""GlaS (Warwick-QU) as a TFDS dataset, plus validation carve-out and in-memory loading.

Source folder layout (the "manual_dir"; the official download or the lossless PNG copy):

    Grade.csv                    name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)
    train_1.bmp|png   train_1_anno.bmp|png      … train_85     (85 images)
    testA_1.bmp|png   testA_1_anno.bmp|png      … testA_60     (60 images)
    testB_1.bmp|png   testB_1_anno.bmp|png      … testB_20     (20 images)

Other files in the folder (README, checksums, …) are ignored. File extensions are matched
case-insensitively. Splits of the TFDS builder `glas`: `train` (85), `test_a` (60), `test_b` (20) and
`test` (= test_a + test_b, 80). Features per example: `image` uint8[H, W, 3], `mask` uint8[H, W, 1]
(instance ids, 0 = background), `name` (e.g. "train_1"), `grade` (ClassLabel benign/malignant from
Grade.csv), `patient` (Grade.csv `patient ID`, as text).

Input checking (`scan_source`): every problem raises `GlasDataError` naming the file and what was
expected, before anything is written (the TFDS cache is only created after the whole folder passed):
missing folder or Grade.csv; image without mask or mask without image; an image missing from
Grade.csv; the same name as both .bmp and .png; unreadable or truncated file; image/mask size mismatch;
a mask with channels (RGB/RGBA/LA…) or a mask mode other than 8-bit gray / palette indices / 1-bit;
unexpected split counts (85/60/20) unless `allow_partial`.
Accepted with a warning (logged, and kept in the notes that stage `prepare` writes to its summary):
Grade.csv rows that name no image; a mask that looks binary (its only non-zero value is 255, or it
covers several separate regions), whose gland instances are then derived as its 8-connected
components (`binary_to_instances`) instead of merging every gland into one object.
Image colour modes: RGB is used as is. Grayscale (L, LA, 1), palette (P/PA) and RGBA images are
CONVERTED to RGB with a warning (alpha is dropped, gray is replicated to 3 channels); any other mode
(16-bit, float, CMYK, …) is refused.

`load_splits(config.data)` is what the stages use: it checks the folder (or generates the embedded
synthetic set when `data.dir` is empty), builds/reuses the TFDS dataset in a cache folder keyed by the
source folder's path and file sizes/mtimes (a changed folder never reuses a stale cache), reads every
split into memory as NumPy and carves the validation subset out of train (`select_validation`).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from absl import logging

# Order of the TFDS splits generated from the three GlaS name prefixes.
SPLIT_PREFIXES = {"train": "train", "test_a": "testA", "test_b": "testB"}
PREFIX_TO_SPLIT = {v: k for k, v in SPLIT_PREFIXES.items()}
EXPECTED_COUNTS = {"train": 85, "test_a": 60, "test_b": 20}
GRADES = ("benign", "malignant")
IMAGE_SUFFIXES = (".png", ".bmp")
BUILDER_VERSION = "1.1.0"

_FILE_RE = re.compile(r"^(train|testA|testB)_(\d+)(_anno)?\.(png|bmp)$", re.IGNORECASE)
_CANON_PREFIX = {"train": "train", "testa": "testA", "testb": "testB"}


class GlasDataError(ValueError):
  """A GlaS source folder (or config) that does not match what the loader expects."""


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
  """One image/mask pair found in a source folder (not decoded)."""
  name: str
  split: str  # train | test_a | test_b
  image_path: Path
  mask_path: Path
  grade: str
  patient: str


@dataclasses.dataclass
class GlasSplits:
  """What `load_splits` returns.

  Attributes:
    splits: "train" (train minus validation), "val", "test_a", "test_b", "test" (= test_a + test_b),
      each a list of `Example` sorted by natural name order (train_2 before train_10).
    synthetic: True when the data is the embedded synthetic set (never report accuracy on it).
    source: the folder the data was read from.
    val_names: names carved out of train for validation.
    cache_dir: the TFDS data_dir used.
    notes: warnings raised while reading (colour conversions, capped validation size, …).
  """
  splits: dict[str, list[Example]]
  synthetic: bool
  source: str
  val_names: list[str]
  cache_dir: str
  notes: list[str]

  def counts(self) -> dict[str, int]:
    return {k: len(v) for k, v in self.splits.items()}


def natural_key(name: str) -> tuple:
  """Sort key: split prefix order (train, testA, testB), then the number."""
  m = re.match(r"^(train|testA|testB)_(\d+)$", name)
  if not m:
    return (9, name, 0)
  return (list(SPLIT_PREFIXES.values()).index(m.group(1)), "", int(m.group(2)))


# ----------------------------------------------------------------------------------------------
# Source folder scanning and checking.
# ----------------------------------------------------------------------------------------------


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


def _png_kind(path: Path) -> tuple[int, int] | None:
  """(bit depth, colour type) from a PNG's IHDR, or None when not a PNG."""
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

  Raises:
    GlasDataError: see the module docstring.
  """
  records = list_source(folder, notes)
  check_counts(records, folder, expected, allow_partial)
  if decode:
    validate_records(records, notes)
  return records


def source_fingerprint(folder: str | os.PathLike, records: Iterable[SourceRecord]) -> str:
  """Hex digest of the resolved folder path, the builder version and every used file's name, size and
  mtime: the key of the prepared-TFDS cache (a changed or different folder gets a new cache)."""
  folder = Path(folder).expanduser().resolve()
  h = hashlib.sha256(f"glas-{BUILDER_VERSION}\n{folder}\n".encode())
  paths = [folder / "Grade.csv"]
  for r in records:
    paths += [r.image_path, r.mask_path]
  for p in paths:
    st = p.stat()
    h.update(f"{p.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# The TFDS builder.
# ----------------------------------------------------------------------------------------------

import tensorflow_datasets as tfds  # noqa: E402  (kept below the pure-Python helpers on purpose)


class Glas(tfds.core.GeneratorBasedBuilder):
  """TFDS builder `glas`: the GlaS/Warwick-QU gland segmentation set read from `manual_dir`.

  Constructor extras (keyword-only, besides TFDS's `data_dir`, `config`, `version`):
    expected_counts: {split: count} checked unless `allow_partial` (default 85/60/20).
    allow_partial: accept other counts (a warning is logged).
    validated: skip the pixel-level checks because the caller already ran `scan_source(decode=True)`.
  """

  VERSION = tfds.core.Version(BUILDER_VERSION)
  RELEASE_NOTES = {
      "1.0.0": "GlaS with instance masks, grade and patient ID; test = test_a + test_b.",
      "1.1.0": "Binary-looking masks (0/255, one id over several regions) stored as connected components.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download GlaS (Warwick-QU, "Gland Segmentation in Colon Histology Images Challenge", MICCAI 2015) and
  point manual_dir (or --config.data.dir) at the folder that holds train_N.bmp, train_N_anno.bmp,
  testA_*, testB_* and Grade.csv (.png copies work too). Research use only; cite Sirinukunwattana et al.
  """

  def __init__(self, *, expected_counts: Mapping[str, int] | None = None, allow_partial: bool = False,
               validated: bool = False, **kwargs: Any):
    self._expected_counts = dict(expected_counts or EXPECTED_COUNTS)
    self._allow_partial = allow_partial
    self._validated = validated
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="GlaS colon histology gland segmentation (165 H&E images, instance masks, grades).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png"),
            "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
            "name": tfds.features.Text(),
            "grade": tfds.features.ClassLabel(names=list(GRADES)),
            "patient": tfds.features.Text(),
        }),
        supervised_keys=("image", "mask"),
        homepage="https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/",
        citation=("K. Sirinukunwattana et al., Gland segmentation in colon histology images: The GlaS "
                  "challenge contest, Medical Image Analysis 35:489-502, 2017."),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    records = scan_source(dl_manager.manual_dir, expected=self._expected_counts,
                          allow_partial=self._allow_partial, decode=not self._validated)
    gens = {}
    for split in SPLIT_PREFIXES:
      recs = [r for r in records if r.split == split]
      if recs:
        gens[split] = self._generate_examples(recs)
    test = [r for r in records if r.split in ("test_a", "test_b")]
    if test:
      gens["test"] = self._generate_examples(test)
    return gens

  def _generate_examples(self, records: Sequence[SourceRecord]):
    for r in records:
      # 8-bit RGB / 8-bit gray PNGs are stored byte for byte (no re-encode); anything else is decoded,
      # converted as documented and stored as PNG.
      if _png_kind(r.image_path) == (8, 2):
        image: Any = r.image_path.read_bytes()
      else:
        image = decode_image(r.image_path, warn=False)  # warned during the checks
      converted: list[str] = []
      decoded = decode_mask(r.mask_path, converted, warn=False)  # warned during the checks
      if _png_kind(r.mask_path) == (8, 0) and not converted:
        mask: Any = r.mask_path.read_bytes()
      else:
        mask = decoded[..., None]
      yield r.name, {"image": image, "mask": mask, "name": r.name, "grade": r.grade, "patient": r.patient}


# ----------------------------------------------------------------------------------------------
# Validation carve-out.
# ----------------------------------------------------------------------------------------------


def _stable_rank(key: str) -> int:
  return int.from_bytes(hashlib.sha256(f"oeem-val:{key}".encode()).digest()[:8], "big")


def select_validation(items: Sequence[tuple[str, str, str]], val_count: int = 10,
                      val_names: str | Sequence[str] = "", notes: list[str] | None = None) -> list[str]:
  """Chooses the validation images carved out of train.

  Deterministic (no RNG state; ties broken by a fixed hash of the patient IDs) and patient-whole.
  Among all sets of whole patients (exhaustive up to 20 patients, greedy beyond) it picks, in order of
  priority: both grades present in validation AND in the remaining train; image count closest to the
  target; grades most balanced; most patients. The target is `val_count`, capped at a quarter of the
  train images (a note is added when capped; fewer than 4 train images give no validation set). If no
  set has both grades on both sides, the constraint is relaxed (with a note): first validation may hold
  a single grade (the train side keeps both), then anything goes.

  Args:
    items: (name, patient, grade) for every train image.
    val_count: target number of images (0 = no validation set).
    val_names: explicit names (comma-separated string or list); overrides `val_count`. A patient split
      across both sides only gives a note (the explicit choice is honoured).
    notes: list that receives human-readable notes.

  Returns:
    sorted (natural order) list of names.

  Raises:
    GlasDataError: an explicit name that is not a train image.
  """
  notes = notes if notes is not None else []
  names = [n for n, _, _ in items]
  if isinstance(val_names, str):
    val_names = [v.strip() for v in val_names.split(",") if v.strip()]
  if val_names:
    unknown = [v for v in val_names if v not in names]
    if unknown:
      raise GlasDataError(f"config key data.val_names: {unknown} are not train images; expected names like "
                          "train_3")
    chosen = set(val_names)
    split_pats = sorted({p for n, p, _ in items if n in chosen} & {p for n, p, _ in items if n not in chosen})
    if split_pats:
      notes.append(f"data.val_names puts patients {split_pats} on both sides of the train/val split")
    return sorted(chosen, key=natural_key)
  if val_count <= 0 or len(items) < 2:
    return []
  target = int(val_count)
  cap = len(items) // 4
  if cap == 0:
    notes.append(f"only {len(items)} train images: no validation subset")
    return []
  if target > cap:
    notes.append(f"data.val_count={val_count} is more than a quarter of the {len(items)} train images; "
                 f"using {cap}")
    target = cap
  pats = sorted({p for _, p, _ in items}, key=_stable_rank)
  index = {p: i for i, p in enumerate(pats)}
  n_ben = np.zeros(len(pats), np.int64)
  n_mal = np.zeros(len(pats), np.int64)
  for _, p, g in items:
    (n_ben if g == "benign" else n_mal)[index[p]] += 1
  tot_b, tot_m = n_ben.sum(), n_mal.sum()
  npat = len(pats)
  if npat < 2:
    notes.append("only one patient in train: no validation subset")
    return []
  if npat <= 20:
    masks = np.arange(1, 2 ** npat - 1, dtype=np.int64)  # non-empty proper subsets
    bits = (masks[:, None] >> np.arange(npat)[None, :]) & 1
  else:  # greedy candidates: prefixes of the hash order plus one patient of each grade
    order = np.arange(npat)
    bits_list = []
    for k in range(1, npat):
      b = np.zeros(npat, np.int64)
      b[order[:k]] = 1
      bits_list.append(b)
    bits = np.stack(bits_list)
    masks = np.arange(len(bits))
  vb, vm = bits @ n_ben, bits @ n_mal
  count = vb + vm
  both_val = (vb > 0) & (vm > 0)
  both_train = ((tot_b - vb) > 0) & ((tot_m - vm) > 0)
  for valid, relax in ((both_val & both_train, None), (both_train, "validation holds a single grade"),
                       (np.ones_like(both_val), "validation or remaining train holds a single grade")):
    if valid.any():
      if relax:
        notes.append(f"validation carve-out: {relax}")
      break
  idx = np.flatnonzero(valid)
  keys = (masks[idx], -bits[idx].sum(1), np.abs(vb - vm)[idx], np.abs(count - target)[idx])
  best = idx[np.lexsort(keys)[0]]
  chosen_pats = {pats[i] for i in np.flatnonzero(bits[best])}
  return sorted((n for n, p, _ in items if p in chosen_pats), key=natural_key)


# ----------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------


def cache_root(data_cfg) -> Path:
  """`data.cache_dir`, else `$XDG_CACHE_HOME/oeem_jax`, else `~/.cache/oeem_jax`."""
  d = _get(data_cfg, "cache_dir", "")
  if d:
    return Path(d).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  return (Path(xdg) if xdg else Path.home() / ".cache") / "oeem_jax"


def _get(cfg, key: str, default: Any) -> Any:
  try:
    v = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  except AttributeError:
    v = default
  return default if v is None else v


def build_dataset(folder: str | os.PathLike, root: str | os.PathLike, *,
                  expected: Mapping[str, int] = EXPECTED_COUNTS, allow_partial: bool = False,
                  notes: list[str] | None = None) -> Glas:
  """Checks `folder` and builds (or reuses) the prepared TFDS `glas` dataset under `root`.

  The TFDS data_dir is `root/tfds/glas-<fingerprint[:16]>`; nothing is written before every check
  passed. A cache whose fingerprint matches is reused without re-decoding the source; the notes of
  its pixel checks (colour conversions, binary masks) are kept beside it in `decode_notes.json` and
  given again (logged and appended to `notes`) on reuse.

  Returns:
    the prepared `Glas` builder (use `.as_dataset(split=...)`).

  Raises:
    GlasDataError: see `scan_source`.
  """
  folder = Path(folder).expanduser()
  records = scan_source(folder, expected=expected, allow_partial=allow_partial, decode=False,
                        notes=notes)
  key = source_fingerprint(folder, records)[:16]
  data_dir = Path(root).expanduser() / "tfds" / f"glas-{key}"
  builder_kw = dict(expected_counts=expected, allow_partial=allow_partial, validated=True)
  notes_file = data_dir / "decode_notes.json"
  if not (data_dir / "glas" / BUILDER_VERSION / "dataset_info.json").is_file():
    decode_notes: list[str] = []
    validate_records(records, decode_notes)  # pixel checks before anything is written
    logging.info("Preparing TFDS glas from %s into %s", folder, data_dir)
    tfds.disable_progress_bar()
    builder = Glas(data_dir=os.fspath(data_dir), **builder_kw)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(folder), try_download_gcs=False))
    from oeem_jax import io_utils
    io_utils.atomic_write_json(notes_file, decode_notes)
  else:
    logging.info("Reusing prepared TFDS glas in %s (source %s)", data_dir, folder)
    builder = Glas(data_dir=os.fspath(data_dir), **builder_kw)
    decode_notes = json.loads(notes_file.read_text()) if notes_file.is_file() else []
    for n in decode_notes:  # warned when the cache was built, in another process
      logging.warning("%s (noted when %s was prepared)", n, data_dir)
  if notes is not None:
    notes.extend(decode_notes)
  return builder


def read_split(builder: Glas, split: str) -> list[Example]:
  """Decodes a prepared split into memory, sorted by natural name order (empty list if absent)."""
  if split not in builder.info.splits:
    return []
  ds = builder.as_dataset(split=split, shuffle_files=False)
  grade_names = builder.info.features["grade"].names
  out = []
  for ex in tfds.as_numpy(ds):
    out.append(Example(name=ex["name"].decode(), image=ex["image"], mask=ex["mask"][..., 0],
                       grade=grade_names[int(ex["grade"])], patient=ex["patient"].decode()))
  out.sort(key=lambda e: natural_key(e.name))
  return out


_SYNTH_BANNER = (
    "\n" + "=" * 78 + "\n"
    "  SYNTHETIC DATA: data.dir is empty, so oeem_jax uses its small procedurally drawn GlaS-shaped\n"
    "  stand-in set ({n_train} train + {n_test} test images in {folder}).\n"
    "  Numbers computed on it mean nothing about gland segmentation. To use GlaS, download it and pass\n"
    "      --config.data.dir=/path/to/glas   (folder with train_N.bmp|png, *_anno, Grade.csv)\n"
    + "=" * 78)


_BANNER_SHOWN: set[str] = set()


def load_splits(data_cfg) -> GlasSplits:
  """Reads GlaS (or the synthetic stand-in) into memory with the validation carve-out.

  Args:
    data_cfg: `config.data` (ConfigDict or any object with these attributes): dir ("" = synthetic),
      cache_dir, val_count, val_names, allow_partial, synthetic_train, synthetic_test.

  Returns:
    GlasSplits; `.splits` has train (train minus val), val, test_a, test_b, test. Images uint8[H,W,3],
    masks uint8[H,W] instance ids.

  Raises:
    GlasDataError: bad source folder or validation names (nothing is written before the checks pass).
  """
  from oeem_jax.data import synthetic

  notes: list[str] = []
  root = cache_root(data_cfg)
  src = str(_get(data_cfg, "dir", "") or "")
  if src:
    folder = Path(src).expanduser()
    expected = EXPECTED_COUNTS
    allow_partial = bool(_get(data_cfg, "allow_partial", False))
    is_synth = False
  else:
    n_train = int(_get(data_cfg, "synthetic_train", 12))
    n_test = int(_get(data_cfg, "synthetic_test", 4))
    folder = synthetic.ensure_synthetic_glas(root, n_train=n_train, n_test=n_test)
    expected = synthetic.expected_counts(n_train, n_test)
    allow_partial = False
    is_synth = True
    if str(folder) not in _BANNER_SHOWN:  # once per process: a pipeline loads the data per stage
      _BANNER_SHOWN.add(str(folder))
      logging.warning(_SYNTH_BANNER.format(n_train=n_train, n_test=n_test, folder=folder))
    else:
      logging.info("data: the SYNTHETIC stand-in set again (%s; see the banner above)", folder)
  builder = build_dataset(folder, root, expected=expected, allow_partial=allow_partial, notes=notes)
  splits = {s: read_split(builder, s) for s in SPLIT_PREFIXES}
  train_all = splits.pop("train")
  logged = len(notes)  # the notes so far were logged where they arose
  val = set(select_validation([(e.name, e.patient, e.grade) for e in train_all],
                              int(_get(data_cfg, "val_count", 10)), _get(data_cfg, "val_names", ""), notes))
  for n in notes[logged:]:
    logging.warning("%s", n)
  out = {
      "train": [e for e in train_all if e.name not in val],
      "val": [e for e in train_all if e.name in val],
      "test_a": splits["test_a"],
      "test_b": splits["test_b"],
  }
  out["test"] = out["test_a"] + out["test_b"]
  return GlasSplits(splits=out, synthetic=is_synth, source=str(folder.resolve()),
                    val_names=sorted(val, key=natural_key), cache_dir=os.fspath(builder.data_dir), notes=notes)
