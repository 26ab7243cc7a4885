"""`load_splits(config.data)`: GlaS (or the synthetic stand-in) in memory, as the stages use it.

It checks the source folder (or draws the embedded synthetic set when `data.dir` is empty), builds or
reuses the TFDS dataset `glas` in a cache folder keyed by the source (`glas.build_dataset`), reads every
split into memory as NumPy and carves the validation subset out of train (`splits.select_validation`).

One pipeline process runs up to four stages that each call `load_splits` (prepare or cls, cam, seg,
eval). The decoded examples are therefore kept in memory per process, keyed by the cache root, the
source fingerprint (folder path, file sizes and mtimes) and the count checks: a later call with the same
key lists the folder again (cheap; a changed file gives a new key) but does not decode a single image.
The validation carve-out is computed on every call from that call's `data.val_count` / `data.val_names`.
At most `_DECODED_MAX` decoded sets are kept; `forget_decoded()` drops them.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from absl import logging

from oeem_jax.data.source import EXPECTED_COUNTS, SPLIT_PREFIXES, Example, natural_key, scan_source
from oeem_jax.data.splits import carve_validation, select_validation
from oeem_jax.runtime.io_utils import cache_root


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


def _get(cfg, key: str, default: Any) -> Any:
  try:
    v = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  except AttributeError:
    v = default
  return default if v is None else v


# Decoded sets of this process: key -> ({split: [Example]}, decode notes, TFDS data_dir), oldest first.
_DECODED: collections.OrderedDict[tuple, tuple[dict[str, list[Example]], list[str], str]] = (
    collections.OrderedDict())
_DECODED_MAX = 2


def forget_decoded() -> None:
  """Drops the decoded examples kept by `decoded_splits` (the next call reads the TFDS cache again)."""
  _DECODED.clear()


def decoded_splits(folder: str | os.PathLike, root: str | os.PathLike, *,
                   expected: Mapping[str, int] = EXPECTED_COUNTS, allow_partial: bool = False,
                   notes: list[str] | None = None) -> tuple[dict[str, list[Example]], str]:
  """The decoded TFDS splits of a source folder, decoded at most once per process and key.

  The folder is listed and checked on every call (`scan_source(decode=False)`, which also gives the
  source fingerprint); on the first call for a key the TFDS dataset is built or reused
  (`glas.build_dataset`) and read into memory (`glas.read_split`). Later calls with the same key
  return the same `Example` objects (the arrays are shared: do not modify them in place) in new lists,
  and append the same decode notes to `notes` (they were logged on the first call).

  Args:
    folder: the GlaS source folder.
    root: cache root (`cache_root(config.data)`).
    expected: {split: image count} checked unless `allow_partial`.
    allow_partial: accept other counts (with a warning).
    notes: list that receives the notes of the checks and of the decoding.

  Returns:
    ({"train", "test_a", "test_b": [Example] in natural name order (empty when absent)},
     the TFDS data_dir of the prepared dataset).

  Raises:
    GlasDataError: see `source.scan_source` (nothing is written before the checks pass).
  """
  from oeem_jax.data import glas  # the TFDS builder (imports TensorFlow)

  notes = notes if notes is not None else []
  folder = Path(folder).expanduser()
  records = scan_source(folder, expected=expected, allow_partial=allow_partial, decode=False, notes=notes)
  key = (os.fspath(Path(root).expanduser().resolve()), glas.source_fingerprint(folder, records),
         tuple(sorted(expected.items())), bool(allow_partial))
  entry = _DECODED.get(key)
  if entry is None:
    decode_notes: list[str] = []
    builder = glas.build_dataset(folder, root, expected=expected, allow_partial=allow_partial,
                                 notes=decode_notes, records=records)
    entry = ({s: glas.read_split(builder, s) for s in SPLIT_PREFIXES}, decode_notes,
             os.fspath(builder.data_dir))
    _DECODED[key] = entry
    while len(_DECODED) > _DECODED_MAX:
      _DECODED.popitem(last=False)
  else:
    _DECODED.move_to_end(key)
    logging.info("data: %s already decoded in this process (from %s); not read again", folder, entry[2])
  by_split, decode_notes, data_dir = entry
  notes.extend(decode_notes)
  return {s: list(v) for s, v in by_split.items()}, data_dir


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
    masks uint8[H,W] instance ids. Within one process the examples of an unchanged source are decoded
    once and shared between calls (`decoded_splits`); the lists are new on every call.

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
  by_split, data_dir = decoded_splits(folder, root, expected=expected, allow_partial=allow_partial,
                                      notes=notes)
  logged = len(notes)  # the notes so far were logged where they arose
  val = set(select_validation([(e.name, e.patient, e.grade) for e in by_split["train"]],
                              int(_get(data_cfg, "val_count", 10)), _get(data_cfg, "val_names", ""), notes))
  for n in notes[logged:]:
    logging.warning("%s", n)
  return GlasSplits(splits=carve_validation(by_split, val), synthetic=is_synth, source=str(folder.resolve()),
                    val_names=sorted(val, key=natural_key), cache_dir=data_dir, notes=notes)
