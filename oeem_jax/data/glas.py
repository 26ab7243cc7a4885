"""GlaS (Warwick-QU) as the TFDS dataset `glas`: the builder and its cache.

The data layer by job:
  `source`   scan, check and decode a GlaS source folder (`scan_source`, `decode_image`, `decode_mask`);
  `splits`   the validation subset carved out of train (`select_validation`, `carve_validation`);
  `glas`     (this module) the TFDS builder `Glas`, its cache keyed by the source (`build_dataset`) and
             reading a prepared split into memory (`read_split`);
  `loader`   `load_splits(config.data)`, what the stages call: synthetic set or GlaS folder, the
             decoded examples kept in memory per process, validation carve-out.
Each name is imported from the module that defines it (`GlasDataError` from `oeem_jax.errors`).

Why TFDS (the project's stack is fixed; it also earns its place): the decoded, checked examples are
built once into a *versioned* dataset (`BUILDER_VERSION`, with `RELEASE_NOTES`; a new version is built
beside the old one, never mixed with it), stored as TFRecord shards whose every record carries a
CRC32C that TensorFlow's reader verifies (a damaged cache fails loudly instead of giving wrong
pixels), described by a `dataset_info.json` (features, per-split example counts) and *cached* under
a folder keyed by `source_fingerprint` (source path, file sizes and mtimes, builder version), so a
changed folder never reuses a stale build and an unchanged one is not decoded again. The typed
features (PNG-encoded uint8 images and masks, ClassLabel grade) and `as_dataset` give tf.data input.

Splits of the builder: `train` (85), `test_a` (60), `test_b` (20) and `test` (= test_a + test_b, 80).
Features per example: `image` uint8[H, W, 3], `mask` uint8[H, W, 1] (instance ids, 0 = background),
`name` (e.g. "train_1"), `grade` (ClassLabel benign/malignant from Grade.csv), `patient` (Grade.csv
`patient ID`, as text). Nothing is written before the whole folder passed the checks of
`source.scan_source`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from oeem_jax.data.source import (
  EXPECTED_COUNTS,
  GRADES,
  SPLIT_PREFIXES,
  Example,
  SourceRecord,
  decode_image,
  decode_mask,
  natural_key,
  png_kind,
  scan_source,
  validate_records,
)

BUILDER_VERSION = "1.1.0"

__all__ = ["BUILDER_VERSION", "Glas", "build_dataset", "read_split", "source_fingerprint"]


def source_fingerprint(folder: str | os.PathLike, records: Iterable[SourceRecord]) -> str:
  """The key of the prepared-TFDS cache: a changed or different folder gets a new cache.

  Args:
    folder: the source folder.
    records: its records (`source.list_source` / `scan_source`).

  Returns:
    64 hex digits: SHA-256 of the builder version, the resolved folder path and the name, size (bytes)
    and mtime (ns) of Grade.csv and of every image and mask in `records`.

  Raises:
    OSError: a file of `records` vanished.
  """
  folder = Path(folder).expanduser().resolve()
  h = hashlib.sha256(f"glas-{BUILDER_VERSION}\n{folder}\n".encode())
  paths = [folder / "Grade.csv"]
  for r in records:
    paths += [r.image_path, r.mask_path]
  for p in paths:
    st = p.stat()
    h.update(f"{p.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


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
      if png_kind(r.image_path) == (8, 2):
        image: Any = r.image_path.read_bytes()
      else:
        image = decode_image(r.image_path, warn=False)  # warned during the checks
      converted: list[str] = []
      decoded = decode_mask(r.mask_path, converted, warn=False)  # warned during the checks
      if png_kind(r.mask_path) == (8, 0) and not converted:
        mask: Any = r.mask_path.read_bytes()
      else:
        mask = decoded[..., None]
      yield r.name, {"image": image, "mask": mask, "name": r.name, "grade": r.grade, "patient": r.patient}


def build_dataset(folder: str | os.PathLike, root: str | os.PathLike, *,
                  expected: Mapping[str, int] = EXPECTED_COUNTS, allow_partial: bool = False,
                  notes: list[str] | None = None, records: Sequence[SourceRecord] | None = None) -> Glas:
  """Checks `folder` and builds (or reuses) the prepared TFDS `glas` dataset under `root`.

  The TFDS data_dir is `root/tfds/glas-<fingerprint[:16]>`; nothing is written before every check
  passed. Processes that prepare the same fresh cache at once are safe: the one that finishes second
  reuses the first one's copy. A cache whose fingerprint matches is reused without re-decoding the
  source; the notes of its pixel checks (colour conversions, binary masks) are kept beside it in
  `decode_notes.json` and given again (logged and appended to `notes`) on reuse.

  Args:
    folder: the GlaS source folder (see `source`).
    root: cache root (e.g. `io_utils.cache_root(config.data)`).
    expected: {split: image count} checked unless `allow_partial`.
    allow_partial: accept other counts (with a warning).
    notes: list that receives the notes of the checks (see `source.scan_source`).
    records: the folder's records when the caller already ran `scan_source(folder, decode=False)` with
      the same `expected` / `allow_partial` (the listing is then not repeated).

  Returns:
    the prepared `Glas` builder (use `.as_dataset(split=...)` or `read_split`).

  Raises:
    GlasDataError: see `source.scan_source`.
  """
  folder = Path(folder).expanduser()
  if records is None:
    records = scan_source(folder, expected=expected, allow_partial=allow_partial, decode=False,
                          notes=notes)
  key = source_fingerprint(folder, records)[:16]
  data_dir = Path(root).expanduser() / "tfds" / f"glas-{key}"
  builder_kw = dict(expected_counts=expected, allow_partial=allow_partial, validated=True)
  notes_file = data_dir / "decode_notes.json"
  prepared = data_dir / "glas" / BUILDER_VERSION / "dataset_info.json"  # there once TFDS renamed it in
  if not prepared.is_file():
    decode_notes: list[str] = []
    validate_records(records, decode_notes)  # pixel checks before anything is written
    logging.info("Preparing TFDS glas from %s into %s", folder, data_dir)
    tfds.disable_progress_bar()
    builder = Glas(data_dir=os.fspath(data_dir), **builder_kw)
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=os.fspath(folder), try_download_gcs=False))
    except FileExistsError:
      # Another process (a second stage or seed started at the same time on a fresh cache) renamed
      # its finished copy into place first; TFDS renames a complete folder only, so reuse it.
      if not prepared.is_file():
        raise
      logging.info("Another process prepared %s first; reusing it", data_dir)
      builder = Glas(data_dir=os.fspath(data_dir), **builder_kw)
    from oeem_jax.runtime import io_utils
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
  """Decodes a prepared split into memory.

  Args:
    builder: a prepared `Glas` builder (`build_dataset`).
    split: "train", "test_a", "test_b" or "test".

  Returns:
    `Example`s (image uint8[H, W, 3], mask uint8[H, W] instance ids) sorted by natural name order;
    an empty list when the builder has no such split.
  """
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

