"""GlaS splits in memory and the validation subset carved out of train.

GlaS has no validation split (train 85, testA 60, testB 20 images; Sirinukunwattana et al., MedIA 2017).
`select_validation` chooses a deterministic, patient-whole subset of the train images (by Grade.csv
patient ID and grade) and `carve_validation` turns the decoded TFDS splits into the five splits the
stages use: train (train minus validation), val, test_a, test_b and test (= test_a + test_b).
"""

from __future__ import annotations

import hashlib
from typing import Collection, Mapping, Sequence

import numpy as np

from oeem_jax.data.source import Example, natural_key
from oeem_jax.errors import GlasDataError


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


def carve_validation(by_split: Mapping[str, Sequence[Example]], val_names: Collection[str]) -> dict[str, list[Example]]:
  """The stages' splits from the decoded TFDS splits and the chosen validation names.

  Args:
    by_split: "train", "test_a", "test_b" lists of `Example` (natural name order); a missing key counts
      as an empty split. The lists are not modified.
    val_names: train image names that form the validation subset (e.g. from `select_validation`).

  Returns:
    {"train": train minus validation, "val": the validation images, "test_a", "test_b",
     "test": test_a + test_b}, each a new list in the order of `by_split`.
  """
  train_all = list(by_split.get("train", ()))
  val = set(val_names)
  out = {
      "train": [e for e in train_all if e.name not in val],
      "val": [e for e in train_all if e.name in val],
      "test_a": list(by_split.get("test_a", ())),
      "test_b": list(by_split.get("test_b", ())),
  }
  out["test"] = out["test_a"] + out["test_b"]
  return out
