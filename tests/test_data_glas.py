"""GlaS TFDS builder, input checks, validation carve-out and synthetic set (oeem_jax.data.glas/synthetic)."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from oeem_jax import errors
from oeem_jax.config.base import get_base_config
from oeem_jax.data import glas, loader, source, splits, synthetic

TINY = {"train": 2, "test_a": 1, "test_b": 1}


def _cfg(**kw):
  cfg = get_base_config("prepare").data
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _write_tiny(folder: Path, ext: str = "png", h: int = 12, w: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """A 2 + 1 + 1 image Warwick-QU folder with random RGB images and two-instance masks."""
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  rows = ["name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
  arrays = {}
  for k, (name, pat, grade) in enumerate([("train_1", 1, "benign"), ("train_2", 2, "malignant"),
                                          ("testA_1", 3, "benign"), ("testB_1", 4, "malignant")]):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[2:5, 2:6] = 1
    mask[7:10, 8 + k % 3:14] = 2
    Image.fromarray(image).save(folder / f"{name}.{ext}")
    Image.fromarray(mask).save(folder / f"{name}_anno.{ext}")
    rows.append(f"{name},{pat}, {grade}, x")
    arrays[name] = (image, mask)
  (folder / "Grade.csv").write_text("\n".join(rows) + "\n")
  return arrays


def _scan(folder):
  return source.scan_source(folder, expected=TINY)


# --------------------------------------------------------------------------- real GlaS


def test_real_counts_and_splits(glas_splits):
  c = glas_splits.counts()
  assert (c["train"] + c["val"], c["test_a"], c["test_b"], c["test"]) == (85, 60, 20, 80)
  assert c["val"] == 10
  assert not glas_splits.synthetic
  names = [e.name for e in glas_splits.splits["test"]]
  assert names == [e.name for e in glas_splits.splits["test_a"] + glas_splits.splits["test_b"]]
  assert names[:2] == ["testA_1", "testA_2"] and names[-1] == "testB_20"


def test_real_sizes_pixels_grades(glas_splits, glas_dir):
  ex = {e.name: e for split in ("train", "val", "test") for e in glas_splits.splits[split]}
  assert len(ex) == 165
  sizes = {"train_1": (522, 775), "train_36": (453, 589), "train_41": (430, 567), "testA_45": (433, 578),
           "testB_20": (522, 775)}
  for name, hw in sizes.items():
    assert ex[name].image.shape == hw + (3,) and ex[name].image.dtype == np.uint8
    assert ex[name].mask.shape == hw and ex[name].mask.dtype == np.uint8
  np.testing.assert_array_equal(ex["train_1"].image, np.array(Image.open(glas_dir / "train_1.png")))
  np.testing.assert_array_equal(ex["train_1"].mask, np.array(Image.open(glas_dir / "train_1_anno.png")))
  assert int(ex["train_1"].mask.max()) == 7 and int(ex["testA_1"].mask.max()) == 9  # VERIFICATION.tsv
  assert (ex["train_1"].grade, ex["train_1"].patient) == ("malignant", "2")
  assert (ex["testA_1"].grade, ex["testA_1"].patient) == ("benign", "4")
  assert Counter(e.grade for e in ex.values() if e.name.startswith("train"))["benign"] == 37


def test_real_validation_subset(glas_splits):
  val = glas_splits.splits["val"]
  train = glas_splits.splits["train"]
  expected = ["train_7", "train_15", "train_18", "train_54", "train_56", "train_60", "train_67", "train_73",
              "train_80", "train_84"]
  assert glas_splits.val_names == expected == [e.name for e in val]
  assert not {e.name for e in val} & {e.name for e in train}
  assert not {e.patient for e in val} & {e.patient for e in train}  # whole patients
  assert {e.grade for e in val} == {"benign", "malignant"} == {e.grade for e in train}
  # stable: independent of the order the items come in
  items = [(e.name, e.patient, e.grade) for e in train + val]
  random.Random(1).shuffle(items)
  assert splits.select_validation(items, 10) == expected


# --------------------------------------------------------------------------- validation carve-out


def test_select_validation_hand_worked():
  items = ([(f"train_{i}", "A", "benign") for i in (1, 2)] + [(f"train_{i}", "B", "malignant") for i in (3, 4)]
           + [(f"train_{i}", "C", "benign") for i in range(5, 11)]
           + [(f"train_{i}", "D", "malignant") for i in range(11, 17)])
  assert splits.select_validation(items, 4) == ["train_1", "train_2", "train_3", "train_4"]
  notes = []
  assert len(splits.select_validation(items, 10, notes=notes)) == 4  # capped at 16 // 4
  assert "quarter" in notes[0]
  assert splits.select_validation(items, 0) == []
  assert splits.select_validation(items, 4, "train_16, train_5") == ["train_5", "train_16"]
  notes = []
  splits.select_validation(items, 4, ["train_5"], notes)
  assert "both sides" in notes[0]
  with pytest.raises(errors.GlasDataError, match="train_99"):
    splits.select_validation(items, 4, "train_99")
  # one malignant patient only: validation cannot hold both grades without taking them all from train
  items = ([(f"train_{i}", "A", "benign") for i in range(1, 5)] + [(f"train_{i}", "B", "benign") for i in range(5, 9)]
           + [(f"train_{i}", "D", "malignant") for i in (9, 10)])
  notes = []
  chosen = splits.select_validation(items, 2, notes=notes)
  assert chosen in (["train_1", "train_2", "train_3", "train_4"], ["train_5", "train_6", "train_7", "train_8"])
  assert "validation holds a single grade" in notes[0]
  assert splits.select_validation(items[:3], 2) == []  # fewer than 4 images: no validation set


# --------------------------------------------------------------------------- official .bmp layout, cache


def test_bmp_layout_loads_and_cache_is_keyed(tmp_path):
  arrays = _write_tiny(tmp_path / "src", ext="bmp")
  cfg = _cfg(dir=str(tmp_path / "src"), cache_dir=str(tmp_path / "cache"), allow_partial=True)
  data = loader.load_splits(cfg)
  assert data.counts() == {"train": 2, "val": 0, "test_a": 1, "test_b": 1, "test": 2}  # < 4 train: no val
  for e in data.splits["train"] + data.splits["test"]:
    np.testing.assert_array_equal(e.image, arrays[e.name][0])
    np.testing.assert_array_equal(e.mask, arrays[e.name][1])
  assert [e.grade for e in data.splits["train"]] == ["benign", "malignant"]
  again = loader.load_splits(cfg)
  assert again.cache_dir == data.cache_dir
  # a changed source file gives a new cache key and the new content
  new = np.full_like(arrays["train_1"][0], 7)
  Image.fromarray(new).save(tmp_path / "src" / "train_1.bmp")
  os.utime(tmp_path / "src" / "train_1.bmp", ns=(1, 1))
  changed = loader.load_splits(cfg)
  assert changed.cache_dir != data.cache_dir
  np.testing.assert_array_equal(changed.splits["train"][0].image, new)


def test_decoded_examples_are_kept_per_process(tmp_path, monkeypatch):
  # A second load of an unchanged folder decodes nothing (same Example objects, new lists) and carves
  # the validation subset from its own config; another cache root is a different key.
  _write_tiny(tmp_path / "src")
  cfg = _cfg(dir=str(tmp_path / "src"), cache_dir=str(tmp_path / "cache"), allow_partial=True)
  first = loader.load_splits(cfg)
  reads = []
  real_read = glas.read_split
  monkeypatch.setattr(glas, "read_split", lambda builder, split: reads.append(split) or real_read(builder, split))
  again = loader.load_splits(cfg)
  assert reads == []
  assert again.splits["train"] is not first.splits["train"]
  assert [id(e) for e in again.splits["train"]] == [id(e) for e in first.splits["train"]]
  assert (again.cache_dir, again.notes, again.counts()) == (first.cache_dir, first.notes, first.counts())
  other = loader.load_splits(_cfg(dir=str(tmp_path / "src"), cache_dir=str(tmp_path / "cache2"), allow_partial=True))
  assert sorted(reads) == ["test_a", "test_b", "train"] and other.cache_dir != first.cache_dir
  for a, b in zip(other.splits["test"], first.splits["test"]):
    np.testing.assert_array_equal(a.image, b.image)


def test_concurrent_prepare_reuses_the_winners_cache(tmp_path, monkeypatch):
  # Two processes preparing the same fresh cache at once: the first renames its finished copy into
  # place while the second is still writing; the second's rename then fails (FileExistsError inside
  # TFDS) and it must reuse the first one's copy instead of crashing. Simulated in one process: the
  # patched prepare lets "another process" finish first, then runs this builder's own prepare.
  arrays = _write_tiny(tmp_path / "src")
  cfg = _cfg(dir=str(tmp_path / "src"), cache_dir=str(tmp_path / "cache"), allow_partial=True)
  real_generate = glas.Glas._download_and_prepare  # runs inside TFDS's incomplete-folder step
  calls = []

  def racing_generate(self, *args, **kwargs):
    calls.append(self.data_dir)
    if len(calls) == 1:  # the other process, started at the same time, finishes and renames first
      glas.Glas(data_dir=os.fspath(Path(self.data_dir).parents[1]), expected_counts=TINY,
                allow_partial=True, validated=True).download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(tmp_path / "src"),
                                                       try_download_gcs=False))
    return real_generate(self, *args, **kwargs)

  monkeypatch.setattr(glas.Glas, "_download_and_prepare", racing_generate)
  data = loader.load_splits(cfg)
  assert len(calls) == 2  # the other process's prepare and this one's
  assert data.counts()["train"] == 2
  for e in data.splits["train"] + data.splits["test"]:
    np.testing.assert_array_equal(e.image, arrays[e.name][0])
    np.testing.assert_array_equal(e.mask, arrays[e.name][1])
  leftovers = [p.name for p in Path(data.cache_dir).parent.iterdir()]  # cache_dir = .../glas/<version>
  assert leftovers == [glas.BUILDER_VERSION]  # the loser's incomplete copy is gone


# --------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
  with pytest.raises(errors.GlasDataError, match="data folder not found"):
    loader.load_splits(_cfg(dir=str(tmp_path / "nope"), cache_dir=str(tmp_path / "cache")))
  assert not (tmp_path / "cache").exists()


def test_image_without_mask_and_reverse(tmp_path):
  _write_tiny(tmp_path / "a")
  (tmp_path / "a" / "train_2_anno.png").unlink()
  with pytest.raises(errors.GlasDataError, match=r"train_2\.png: image without mask"):
    _scan(tmp_path / "a")
  _write_tiny(tmp_path / "b")
  (tmp_path / "b" / "testB_1.png").unlink()
  with pytest.raises(errors.GlasDataError, match=r"testB_1_anno\.png: mask without image"):
    _scan(tmp_path / "b")


def test_size_mismatch(tmp_path):
  _write_tiny(tmp_path / "a")
  Image.fromarray(np.zeros((12, 15), np.uint8)).save(tmp_path / "a" / "testA_1_anno.png")
  with pytest.raises(errors.GlasDataError, match=r"testA_1_anno\.png: mask is 15x12 .* 16x12; expected equal sizes"):
    _scan(tmp_path / "a")


def test_truncated_and_unreadable_files_write_nothing(tmp_path):
  _write_tiny(tmp_path / "a")
  p = tmp_path / "a" / "train_1.png"
  data = p.read_bytes()
  p.write_bytes(data[: len(data) // 2])
  cfg = _cfg(dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "cache"), allow_partial=True)
  with pytest.raises(errors.GlasDataError, match=r"train_1\.png: unreadable or truncated"):
    loader.load_splits(cfg)
  assert not (tmp_path / "cache" / "tfds").exists()  # nothing written before the checks passed
  p.write_bytes(b"not an image at all")
  with pytest.raises(errors.GlasDataError, match=r"train_1\.png: unreadable"):
    _scan(tmp_path / "a")


def test_mask_with_channels(tmp_path):
  _write_tiny(tmp_path / "a")
  Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(tmp_path / "a" / "train_1_anno.png")
  with pytest.raises(errors.GlasDataError, match=r"train_1_anno\.png: mask has mode RGB with 3 channels"):
    _scan(tmp_path / "a")


def test_gray_and_rgba_images_are_converted_with_warning(tmp_path):
  arrays = _write_tiny(tmp_path / "a")
  gray = arrays["train_1"][0][..., 0]
  Image.fromarray(gray).save(tmp_path / "a" / "train_1.png")
  rgba = np.concatenate([arrays["train_2"][0], np.full((12, 16, 1), 128, np.uint8)], -1)
  Image.fromarray(rgba).save(tmp_path / "a" / "train_2.png")
  notes = []
  with pytest.warns(UserWarning, match="converted to RGB"):
    source.scan_source(tmp_path / "a", expected=TINY, notes=notes)
  assert len(notes) == 2 and "alpha dropped" in notes[1]
  with pytest.warns(UserWarning, match="converted to RGB"):
    data = loader.load_splits(_cfg(dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "c"), allow_partial=True))
  t1, t2 = data.splits["train"]
  np.testing.assert_array_equal(t1.image, np.stack([gray] * 3, -1))
  np.testing.assert_array_equal(t2.image, arrays["train_2"][0])


def test_sixteen_bit_image_refused(tmp_path):
  _write_tiny(tmp_path / "a")
  Image.fromarray(np.zeros((12, 16), np.uint16)).save(tmp_path / "a" / "testA_1.png")
  with pytest.raises(errors.GlasDataError, match=r"testA_1\.png: image colour mode 'I;16' is not supported"):
    _scan(tmp_path / "a")


def test_unexpected_counts(tmp_path):
  _write_tiny(tmp_path / "a")
  with pytest.raises(errors.GlasDataError, match="found 2 train, 1 testA and 1 testB images; expected 85/60/20"):
    loader.load_splits(_cfg(dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "cache")))
  assert not (tmp_path / "cache").exists()
  data = loader.load_splits(_cfg(dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "cache"), allow_partial=True))
  assert data.counts()["test"] == 2


def test_grade_csv_problems_and_duplicates(tmp_path):
  _write_tiny(tmp_path / "a")
  csv = tmp_path / "a" / "Grade.csv"
  text = csv.read_text()
  csv.write_text("\n".join(l for l in text.splitlines() if not l.startswith("testB_1")) + "\n")
  with pytest.raises(errors.GlasDataError, match="no row for testB_1"):
    _scan(tmp_path / "a")
  csv.write_text(text.replace("malignant", "weird", 1))
  with pytest.raises(errors.GlasDataError, match="grade ' weird' for train_2; expected benign or malignant"):
    _scan(tmp_path / "a")
  csv.unlink()
  with pytest.raises(errors.GlasDataError, match="Grade.csv not found"):
    _scan(tmp_path / "a")
  _write_tiny(tmp_path / "b")
  Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(tmp_path / "b" / "train_1.bmp")
  with pytest.raises(errors.GlasDataError, match="train_1 exists twice"):
    _scan(tmp_path / "b")


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic(tmp_path):
  a = synthetic.ensure_synthetic_glas(tmp_path / "x", n_train=3, n_test=1)
  b = synthetic.ensure_synthetic_glas(tmp_path / "y", n_train=3, n_test=1)
  files = sorted(p.name for p in a.iterdir())
  assert files == sorted(p.name for p in b.iterdir())
  assert len(files) == 2 + 2 * 4  # Grade.csv, README.txt, 4 image/mask pairs
  for f in files:
    assert (a / f).read_bytes() == (b / f).read_bytes(), f
  assert synthetic.ensure_synthetic_glas(tmp_path / "x", n_train=3, n_test=1) == a  # reused


def test_synthetic_default_set(synthetic_splits):
  s = synthetic_splits
  assert s.synthetic and "synthetic" in s.source
  assert s.counts() == {"train": 8, "val": 4, "test_a": 2, "test_b": 2, "test": 4}
  for e in s.splits["train"] + s.splits["val"] + s.splits["test"]:
    assert e.image.shape == (192, 256, 3) and e.image.dtype == np.uint8 and e.mask.shape == (192, 256)
    frac = (e.mask > 0).mean()
    assert 0.2 < frac < 0.6, (e.name, frac)
    assert int(e.mask.max()) >= 2  # at least 2 gland instances
  assert {e.grade for e in s.splits["val"]} == {"benign", "malignant"}
  assert not {e.patient for e in s.splits["val"]} & {e.patient for e in s.splits["train"]}


# --------------------------------------------------------------------------- binary masks, Grade.csv rows


def test_binary_masks_become_connected_components(tmp_path):
  # train_1: a 0/255 export of its two glands; testA_1: a 0/1 export (one id, two regions). Both get
  # ids 1, 2 from their 8-connected components, with a note naming the file, kept in the notes of a
  # later load from the cache too. train_2 keeps its own ids.
  arrays = _write_tiny(tmp_path / "a")
  for name, value in (("train_1", 255), ("testA_1", 1)):
    Image.fromarray(((arrays[name][1] > 0) * value).astype(np.uint8)).save(
        tmp_path / "a" / f"{name}_anno.png")
  cfg = _cfg(dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "c"), allow_partial=True)
  for attempt in ("build", "in memory", "reuse"):
    if attempt == "reuse":
      loader.forget_decoded()  # read the prepared TFDS cache again, with its decode_notes.json
    data = loader.load_splits(cfg)
    masks = {e.name: e.mask for split in ("train", "test") for e in data.splits[split]}
    for name in ("train_1", "testA_1", "train_2"):
      np.testing.assert_array_equal(masks[name], arrays[name][1], err_msg=f"{attempt} {name}")
    binary = [n for n in data.notes if "looks binary" in n]
    assert len(binary) == 2, (attempt, data.notes)
    assert binary[0].startswith(str(tmp_path / "a" / "train_1_anno.png") + ": mask looks binary (its "
                                "only non-zero value 255 covers 2 separate region(s))")
    assert "testA_1_anno.png: mask looks binary (its only non-zero value 1 covers 2" in binary[1]


def test_binary_to_instances_leaves_instance_masks_alone():
  one = np.zeros((6, 6), np.uint8)
  one[1:3, 1:3] = 1
  ids, note = source.binary_to_instances(one)
  assert ids is one and note is None  # a single gland with id 1 (3 of the real GlaS masks)
  two = one.copy()
  two[4:6, 4:6] = 2
  assert source.binary_to_instances(two)[1] is None
  diagonal = np.zeros((4, 4), np.uint8)
  diagonal[0, 0] = diagonal[1, 1] = 255  # touching at a corner: one 8-connected gland
  ids, note = source.binary_to_instances(diagonal, "m.png")
  assert ids.max() == 1 and ids[0, 0] == ids[1, 1] == 1 and "covers 1 separate region" in note
  many = np.zeros((2, 2 * 300), np.uint8)
  many[0, ::2] = 1
  with pytest.raises(errors.GlasDataError, match="m.png: binary mask .* 300 separate regions"):
    source.binary_to_instances(many, "m.png")


def test_prepare_summary_records_binary_masks(tmp_path):
  from oeem_jax import stages
  arrays = _write_tiny(tmp_path / "a")
  Image.fromarray(((arrays["train_2"][1] > 0) * 255).astype(np.uint8)).save(tmp_path / "a" / "train_2_anno.png")
  cfg = get_base_config("prepare")
  cfg.data.dir, cfg.data.cache_dir, cfg.data.allow_partial = str(tmp_path / "a"), str(tmp_path / "c"), True
  summary = stages.run_stage(cfg, tmp_path / "w")
  assert summary["binary_masks"] == [str(tmp_path / "a" / "train_2_anno.png")]


def test_grade_rows_without_an_image_are_a_warning(tmp_path):
  _write_tiny(tmp_path / "a")
  with open(tmp_path / "a" / "Grade.csv", "a") as f:
    f.write("train_99,9, benign, x\ntestA_7,9, malignant, x\n")
  notes = []
  records = source.scan_source(tmp_path / "a", expected=TINY, notes=notes)
  assert len(records) == 4
  assert notes == [f"{tmp_path / 'a' / 'Grade.csv'}: 2 row(s) name no image in the folder (train_99, "
                   "testA_7); those rows are ignored"]
