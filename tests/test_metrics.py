"""Tests for oeem_jax.evaluation.metrics against hand-worked cases and slow NumPy/SciPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import directed_hausdorff

from oeem_jax.evaluation import metrics

# ---------------------------------------------------------------------------------------------
# The 6x6 hand-worked example (coordinates are (row, col)).
#
# Ground truth: G1 = rows 0-1 x cols 0-2 (area 6), G2 = rows 2-3 x cols 4-5 (area 4).
# Prediction (binary) -> 8-connected components in raster order:
#   Sa = rows 0-1 x cols 0-1 (area 4, label 1), Sb = {(3,5), (4,5)} (area 2, label 2),
#   Sc = {(5,0)} (area 1, label 3).
#
# Pixel level: TP = |Sa∩G1| + |Sb∩G2| = 4 + 1 = 5, FP = 7 - 5 = 2, FN = 10 - 5 = 5,
#   TN = 36 - 12 = 24 -> conf = [[24, 2], [5, 5]];
#   IoU_gland = 5/12, IoU_bg = 24/31, mIoU = 443/744, Dice = F1 = 10/17, precision 5/7,
#   recall 1/2, accuracy 29/36, reference Dice = 2m/(1+m) = 886/1187.
# Detection: Sa -> G1 covers 4/6 >= 1/2: TP. Sb -> G2 covers 1/4: FP. Sc overlaps nothing: FP.
#   G2 is matched by no TP: FN. TP 1, FP 2, FN 1 -> F1 = 2/(2+2+1) = 2/5.
# Object Dice: Dice(G1,Sa) = 8/10, Dice(G2,Sb) = 2/6, Sc -> 0.
#   S side: (4·4/5 + 2·1/3 + 1·0)/7 = 58/105; G side: (6·4/5 + 4·1/3)/10 = 46/75;
#   Dice_obj = (58/105 + 46/75)/2 = 102/175.
# Object Hausdorff: H(G1,Sa) = 1 (G1's column 2 is 1 from Sa); H(G2,Sb) = √2 ((2,4) to (3,5));
#   Sc has no overlap -> nearest G by Hausdorff: H(G1,Sc) = max(4, |(0,2)-(5,0)| = √29) = √29,
#   H(G2,Sc) = |(2,5)-(5,0)| = √34, so G1 with √29.
#   S side: (4·1 + 2·√2 + 1·√29)/7; G side: (6·1 + 4·√2)/10; H_obj = mean of the two.
# ---------------------------------------------------------------------------------------------

GT = np.array([
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [0, 0, 0, 0, 2, 2],
    [0, 0, 0, 0, 2, 2],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
], np.int32)
PRED = np.array([
    [1, 1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 1],
    [1, 0, 0, 0, 0, 0],
], np.uint8)
S_HAUS = (4 * 1 + 2 * math.sqrt(2) + math.sqrt(29)) / 7
G_HAUS = (6 * 1 + 4 * math.sqrt(2)) / 10
DIAG6 = math.sqrt(50)


def test_label_instances_eight_connected_raster_order():
  lab = metrics.label_instances(PRED)
  assert lab.dtype == np.int32
  expected = np.zeros((6, 6), np.int32)
  expected[0:2, 0:2] = 1
  expected[3:5, 5] = 2
  expected[5, 0] = 3
  np.testing.assert_array_equal(lab, expected)
  # Diagonal neighbours are one object (8-connectivity).
  assert metrics.label_instances(np.eye(4, dtype=np.uint8)).max() == 1


def test_confusion_and_pixel_metrics_hand_worked():
  conf = metrics.confusion_matrix(PRED, (GT > 0).astype(np.int64))
  np.testing.assert_array_equal(conf, [[24, 2], [5, 5]])
  assert conf.dtype == np.int64
  pm = metrics.pixel_metrics(conf)
  assert pm["iou"] == pytest.approx([24 / 31, 5 / 12])
  assert pm["miou"] == pytest.approx(443 / 744)
  assert pm["dice"] == pytest.approx(10 / 17)
  assert pm["f1"] == pm["dice"]
  assert pm["precision"] == pytest.approx(5 / 7)
  assert pm["recall"] == pytest.approx(1 / 2)
  assert pm["accuracy"] == pytest.approx(29 / 36)
  assert pm["reference_dice"] == pytest.approx(886 / 1187)
  assert pm["pixels"] == 36


def test_confusion_ignore_index_and_errors():
  pred = np.array([[0, 1], [1, 1]])
  gt = np.array([[0, 255], [1, 0]])
  np.testing.assert_array_equal(metrics.confusion_matrix(pred, gt), [[1, 1], [0, 1]])
  with pytest.raises(ValueError, match="same shape"):
    metrics.confusion_matrix(pred, gt[:1])
  with pytest.raises(ValueError, match="pred holds values"):
    metrics.confusion_matrix(pred * 2, gt)


def test_object_metrics_hand_worked():
  st = metrics.object_stats(metrics.label_instances(PRED), GT)
  assert (st.tp, st.fp, st.fn, st.num_pred, st.num_gt) == (1, 2, 1, 3, 2)
  assert st.f1 == pytest.approx(2 / 5)
  assert st.precision == pytest.approx(1 / 3)
  assert st.recall == pytest.approx(1 / 2)
  assert st.dice == pytest.approx(102 / 175)
  assert st.hausdorff == pytest.approx((S_HAUS + G_HAUS) / 2)
  assert metrics.object_f1(metrics.label_instances(PRED), GT) == pytest.approx(0.4)
  assert metrics.object_dice(metrics.label_instances(PRED), GT) == pytest.approx(102 / 175)
  assert metrics.object_hausdorff(metrics.label_instances(PRED), GT) == pytest.approx(1.4552418, abs=1e-6)


def test_gt_ids_need_not_be_consecutive():
  gt = np.where(GT == 1, 7, np.where(GT == 2, 30, 0))
  a = metrics.object_stats(metrics.label_instances(PRED), gt)
  b = metrics.object_stats(metrics.label_instances(PRED), GT)
  assert a == b


def test_perfect_prediction_is_ideal():
  res = metrics.evaluate_split([(GT > 0).astype(np.uint8)], [GT])
  assert res["pixel"]["miou"] == 1.0
  assert res["pixel"]["dice"] == 1.0 and res["pixel"]["reference_dice"] == 1.0
  obj = res["object"]
  assert (obj["f1"], obj["dice"], obj["hausdorff"]) == (1.0, 1.0, 0.0)
  assert (obj["tp"], obj["fp"], obj["fn"]) == (2, 0, 0)


def test_empty_prediction():
  # No segmented object: TP 0, FP 0, FN 2 -> F1 0; Dice 0; every G takes the diagonal.
  st = metrics.object_stats(np.zeros((6, 6), np.int32), GT)
  assert (st.tp, st.fp, st.fn) == (0, 0, 2)
  assert st.f1 == 0.0 and st.dice == 0.0
  assert st.hausdorff == pytest.approx(DIAG6 / 2)  # G side = diagonal, S side empty -> 0
  assert metrics.object_hausdorff(np.zeros((6, 6), np.int32), GT, unmatched="inf") == math.inf
  pm = metrics.pixel_metrics(metrics.confusion_matrix(np.zeros((6, 6), int), GT > 0))
  assert pm["iou"][1] == 0.0 and pm["miou"] == pytest.approx((26 / 36) / 2)
  assert math.isnan(pm["precision"]) and pm["recall"] == 0.0 and pm["dice"] == 0.0


def test_empty_ground_truth():
  # Three segmented objects and no gland: all FP; Dice 0; Hausdorff: S side = diagonal.
  st = metrics.object_stats(metrics.label_instances(PRED), np.zeros((6, 6), np.int32))
  assert (st.tp, st.fp, st.fn) == (0, 3, 0)
  assert st.f1 == 0.0 and st.dice == 0.0
  assert st.hausdorff == pytest.approx(DIAG6 / 2)


def test_both_empty():
  z = np.zeros((6, 6), np.int32)
  st = metrics.object_stats(z, z)
  assert (st.f1, st.dice, st.hausdorff) == (1.0, 1.0, 0.0)
  pm = metrics.pixel_metrics(metrics.confusion_matrix(z, z))
  assert math.isnan(pm["iou"][1]) and pm["miou"] == 1.0  # mean over the defined IoUs


def test_fifty_percent_rule():
  # G = one row of 4 pixels. A segment on exactly 2 of them is a TP (>= 50 %); on 2 of 5, a FP.
  gt = np.zeros((3, 6), np.int32)
  gt[1, 0:4] = 1
  seg = np.zeros((3, 6), np.int32)
  seg[1, 0:2] = 1
  st = metrics.object_stats(seg, gt)
  assert (st.tp, st.fp, st.fn) == (1, 0, 0)
  gt[1, 4] = 1  # area 5: 2/5 < 1/2
  st = metrics.object_stats(seg, gt)
  assert (st.tp, st.fp, st.fn) == (0, 1, 1)
  # A segment spanning two glands is matched to the one it overlaps most (ties: smallest id).
  gt = np.zeros((3, 6), np.int32)
  gt[1, 0:2], gt[1, 3:6] = 1, 2
  seg = np.zeros((3, 6), np.int32)
  seg[1, :] = 1
  st = metrics.object_stats(seg, gt)
  assert (st.tp, st.fp, st.fn) == (1, 0, 1)  # matched to G2 (3 pixels) fully covered; G1 missed
  # S: Dice(G2, S) = 6/9; G side: G1 -> S (Dice 4/8), G2 -> S (6/9).
  assert st.dice == pytest.approx(0.5 * (6 / 9 + (2 * 4 / 8 + 3 * 6 / 9) / 5))


def test_split_pooling_sums_counts_and_areas():
  # Split = [hand-worked image, same GT with an empty prediction]. F1 from summed counts:
  # TP 1, FP 2, FN 1 + 2 = 3 -> 2/7. Dice pooled over areas: S side 58/105 (all S objects are in
  # image 1); G side (6·4/5 + 4·1/3 + 0)/20 = 46/150.
  res = metrics.evaluate_split([PRED, np.zeros_like(PRED)], [GT, GT], names=["a", "b"])
  obj = res["object"]
  assert (obj["tp"], obj["fp"], obj["fn"]) == (1, 2, 3)
  assert obj["f1"] == pytest.approx(2 / 7)
  assert obj["dice"] == pytest.approx(0.5 * (58 / 105 + 46 / 150))
  assert obj["hausdorff"] == pytest.approx(0.5 * (S_HAUS + (10 * G_HAUS + 10 * DIAG6) / 20))
  # Pixel metrics from one summed confusion matrix, not a mean of per-image values.
  conf = np.array([[24, 2], [5, 5]]) + np.array([[26, 0], [10, 0]])
  assert res["pixel"]["miou"] == pytest.approx(metrics.pixel_metrics(conf)["miou"])
  assert res["pixel"]["miou"] != pytest.approx(np.mean([r["miou"] for r in res["per_image"]]))
  rows = res["per_image"]
  assert [r["name"] for r in rows] == ["a", "b"]
  assert rows[0]["object_f1"] == pytest.approx(0.4) and rows[1]["object_f1"] == 0.0
  assert rows[0]["miou"] == pytest.approx(443 / 744)
  text = metrics.per_image_csv(rows)
  lines = text.strip().split("\n")
  assert lines[0].split(",") == list(metrics.PER_IMAGE_FIELDS)
  assert lines[1].startswith("a,0.595430,") and len(lines) == 3


def test_pooled_scores_of_two_splits_equal_the_joint_split():
  # test = test_a + test_b: pooling per-image scores must give the joint split's metrics exactly.
  a = [(PRED, GT, "a1"), (np.zeros_like(PRED), GT, "a2")]
  b = [((GT > 0).astype(np.uint8), GT, "b1"), (np.ones_like(PRED), GT, "b2")]
  scores = {n: metrics.score_image(p, g, n) for p, g, n in a + b}
  pooled = metrics.pool_scores([scores[n] for _, _, n in a + b])
  joint = metrics.evaluate_split([p for p, _, _ in a + b], [g for _, g, _ in a + b],
                                 [n for _, _, n in a + b])
  assert pooled["pixel"]["miou"] == pytest.approx(joint["pixel"]["miou"])
  for key in ("f1", "dice", "hausdorff", "tp", "fp", "fn", "num_pred_objects"):
    assert pooled["object"][key] == pytest.approx(joint["object"][key]), key
  only_a = metrics.pool_scores([scores["a1"], scores["a2"]])
  assert only_a["object"]["tp"] == 1 and only_a["num_images"] == 2
  assert joint["object"]["tp"] > only_a["object"]["tp"]
  with pytest.raises(ValueError, match="no images"):
    metrics.pool_scores([])


def test_evaluate_split_errors_name_the_image():
  with pytest.raises(ValueError, match="'b'.*0/1"):
    metrics.evaluate_split([PRED, PRED * 255], [GT, GT], names=["a", "b"])
  with pytest.raises(ValueError, match="same 2-D shape"):
    metrics.evaluate_split([PRED[:5]], [GT])
  with pytest.raises(ValueError, match="2 predictions but 1"):
    metrics.evaluate_split([PRED, PRED], [GT])


def test_write_per_image_csv(tmp_path):
  res = metrics.evaluate_split([PRED], [GT], names=["x"])
  out = tmp_path / "sub" / "per_image.csv"
  metrics.write_per_image_csv(out, res["per_image"])
  assert out.read_text().splitlines()[1].startswith("x,")


# ---------------------------------------------------------------------------------------------
# Cross-check against a slow reference built on scipy.spatial.distance.directed_hausdorff.
# ---------------------------------------------------------------------------------------------


def _slow_object_metrics(s: np.ndarray, g: np.ndarray) -> tuple[float, float]:
  """Object Dice and Hausdorff by the challenge's formulas, object by object (no shortcuts)."""
  s_ids = [i for i in np.unique(s) if i]
  g_ids = [j for j in np.unique(g) if j]

  def haus(a, b):
    pa, pb = np.argwhere(a), np.argwhere(b)
    return max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])

  def dice(a, b):
    return 2 * np.sum(a & b) / (a.sum() + b.sum())

  def best(mask, other, other_ids):
    counts = [np.sum(mask & (other == k)) for k in other_ids]
    return other_ids[int(np.argmax(counts))] if max(counts) > 0 else None

  d_terms, h_terms = [], []
  for mine, theirs, my_ids, their_ids in ((s, g, s_ids, g_ids), (g, s, g_ids, s_ids)):
    total = (mine > 0).sum()
    d_sum = h_sum = 0.0
    for i in my_ids:
      m = mine == i
      k = best(m, theirs, their_ids)
      if k is None:
        h = min(haus(m, theirs == kk) for kk in their_ids)
        d = 0.0
      else:
        h = haus(m, theirs == k)
        d = dice(m, theirs == k)
      d_sum += m.sum() / total * d
      h_sum += m.sum() / total * h
    d_terms.append(d_sum)
    h_terms.append(h_sum)
  return float(np.mean(d_terms)), float(np.mean(h_terms))


def _random_instances(rng, shape, n):
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  lab = np.zeros(shape, np.int32)
  for k in range(1, n + 1):
    cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
    ry, rx = rng.integers(3, 9), rng.integers(3, 9)
    lab[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = k
  return lab


@pytest.mark.parametrize("seed", range(4))
def test_object_dice_and_hausdorff_match_slow_reference(seed):
  rng = np.random.default_rng(seed)
  g = _random_instances(rng, (40, 50), 6)
  # Prediction: a shifted copy of the odd-numbered glands (even ones may be missed) plus random
  # blobs (some overlap nothing), so both partner-less S and partner-less G occur.
  pred = np.roll(g % 2 == 1, (rng.integers(-3, 4), rng.integers(-3, 4)), (0, 1))
  pred |= _random_instances(rng, (40, 50), 3) > 0
  s = metrics.label_instances(pred)
  if not s.any() or not g.any():
    pytest.skip("degenerate draw")
  st = metrics.object_stats(s, g)
  assert 0 < st.tp < st.num_gt  # a mixed case: some matches, some misses
  ref_dice, ref_haus = _slow_object_metrics(s, g)
  assert st.dice == pytest.approx(ref_dice, rel=1e-9)
  assert st.hausdorff == pytest.approx(ref_haus, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# split_instances: distance-transform watershed of touching glands
# ---------------------------------------------------------------------------------------------

_YY, _XX = np.mgrid[:80, :130]


def _disk(cy: int, cx: int, r: int) -> np.ndarray:
  return (_YY - cy) ** 2 + (_XX - cx) ** 2 <= r * r


def _two_disks(r_left: int = 20, r_right: int = 20, neck: int = 4) -> np.ndarray:
  """Two disks (centres 50 px apart) joined by a bar 2·neck + 1 px thick: a merged gland pair."""
  bar = (np.abs(_YY - 40) <= neck) & (_XX >= 35) & (_XX <= 85)
  return (_disk(40, 35, r_left) | _disk(40, 85, r_right) | bar).astype(np.uint8)


def test_two_disks_joined_by_a_neck_split_at_a_suitable_h():
  two = _two_disks()  # peak distance ~20, saddle distance 5 in the neck: dynamic ~15 px
  assert metrics.label_instances(two).max() == 1
  np.testing.assert_array_equal(metrics.split_instances(two, 0), metrics.label_instances(two))
  for h in (2, 4, 8, 14):
    lab = metrics.split_instances(two, h)
    assert lab.dtype == np.int32 and lab.max() == 2, h
    np.testing.assert_array_equal(lab > 0, two > 0)  # pixels unchanged, only the cut
    left, right = lab[40, 35], lab[40, 85]
    assert (left, right) == (1, 2), h  # raster order of first pixels: the left disk starts first
    # The cut lies in the neck: each disk centre's side holds its whole disk minus nothing.
    assert np.all(lab[_disk(40, 35, 15)] == 1) and np.all(lab[_disk(40, 85, 15)] == 2), h
  # h above the neck's dynamic (but below the peak): one gland. The two peaks tie exactly, which
  # skimage's h_maxima alone would keep as two markers; split_instances merges them.
  for h in (17, 19):
    assert metrics.split_instances(two, h).max() == 1, h


def test_unequal_disks_split_by_the_smaller_dynamic():
  two = _two_disks(r_left=20, r_right=14, neck=3)  # smaller peak ~14, saddle 4: dynamic ~10
  assert metrics.split_instances(two, 8).max() == 2
  assert metrics.split_instances(two, 12).max() == 1


def test_single_disk_stays_one_instance_for_any_h():
  one = _disk(40, 60, 25).astype(np.uint8)
  for h in range(0, 40, 3):
    np.testing.assert_array_equal(metrics.split_instances(one, h), metrics.label_instances(one))


def test_h0_is_label_instances_bit_for_bit():
  rng = np.random.default_rng(0)
  for _ in range(5):
    m = (rng.random((40, 50)) < 0.55).astype(np.uint8)
    got = metrics.split_instances(m, 0)
    want = metrics.label_instances(m)
    assert got.dtype == want.dtype == np.int32
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(metrics.split_instances(PRED, 0), metrics.label_instances(PRED))
  empty = np.zeros((7, 9), np.uint8)
  assert metrics.split_instances(empty, 5).dtype == np.int32 and not metrics.split_instances(empty, 5).any()


def test_ids_are_consecutive_in_raster_order_and_small_components_keep_theirs():
  m = _two_disks()
  m[2:5, 2:5] = 1           # a 3x3 speck, peak distance 2 < h: no marker, keeps its own id
  m[70:78, 100:128] = 1     # a bar, peak distance 4.0 < h: no marker either
  lab = metrics.split_instances(m, 6)
  assert lab.dtype == np.int32
  ids = np.unique(lab)
  np.testing.assert_array_equal(ids, np.arange(lab.max() + 1))  # 0..K, no gaps
  assert lab.max() == 4
  np.testing.assert_array_equal(lab > 0, m > 0)
  first = [np.flatnonzero(lab.ravel() == k)[0] for k in range(1, 5)]
  assert first == sorted(first)
  assert lab[3, 3] == 1 and np.all(lab[2:5, 2:5] == 1) and np.all(lab[70:78, 100:128] == 4)
  # Every 8-connected component lies inside one instance or is cut into several: never merged.
  comps = metrics.label_instances(m)
  for k in range(1, lab.max() + 1):
    assert len(np.unique(comps[lab == k])) == 1


@pytest.mark.parametrize("h", [-1, 2.5, True, "3", None])
def test_bad_split_h_raises_naming_it(h):
  with pytest.raises(ValueError, match=r"split_instances: h: expected an integer"):
    metrics.split_instances(_two_disks(), h)
  with pytest.raises(ValueError, match="split_h"):
    metrics.score_image(PRED, GT, "x", split_h=h)
  assert metrics.split_instances(_two_disks(), np.int64(4)).max() == 2  # numpy ints are fine


def test_split_h_changes_object_metrics_not_pixel_metrics():
  two = _two_disks()
  gt = np.zeros(two.shape, np.int32)
  gt[two > 0] = 1
  gt[(two > 0) & (_XX > 60)] = 2  # two touching true glands, predicted as one merged object
  merged = metrics.evaluate_split([two], [gt])
  split = metrics.evaluate_split([two], [gt], split_h=4)
  assert merged["pixel"] == split["pixel"]
  assert merged["object"]["num_pred_objects"] == 1 and split["object"]["num_pred_objects"] == 2
  assert (merged["object"]["tp"], merged["object"]["fn"]) == (1, 1)
  assert (split["object"]["tp"], split["object"]["fp"], split["object"]["fn"]) == (2, 0, 0)
  assert split["object"]["f1"] == 1.0 and merged["object"]["f1"] == pytest.approx(2 / 3)
  assert split["object"]["dice"] > merged["object"]["dice"]


def test_eval_score_splits_and_rescore_thread_split_h():
  import importlib.util
  import types
  from pathlib import Path

  from oeem_jax.stages import eval as eval_stage

  two = _two_disks()
  gt = np.zeros(two.shape, np.int32)
  gt[two > 0] = 1
  gt[(two > 0) & (_XX > 60)] = 2
  examples = {"val": [types.SimpleNamespace(name="a", mask=gt)]}
  preds = {"a": two}
  r0, _ = eval_stage.score_splits(preds, examples, ["val"])
  r4, rows = eval_stage.score_splits(preds, examples, ["val"], split_h=4)
  assert r0["val"]["object"]["num_pred_objects"] == 1 and r4["val"]["object"]["num_pred_objects"] == 2
  assert rows[0]["num_pred_objects"] == 2 and rows[0]["split"] == "val"
  # launch/rescore_predictions.py: one row per (area, h, split), the h reaching the object metrics.
  path = Path(__file__).resolve().parents[1] / "launch" / "rescore_predictions.py"
  spec = importlib.util.spec_from_file_location("rescore_predictions_under_test", path)
  rescore = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(rescore)
  speck = two.copy()
  speck[2:5, 2:5] = 1  # a 9-pixel false positive, removed at area 500
  out = rescore.rescore({"a": speck}, examples, ["val"], areas=[0, 500], split_hs=[0, 4])
  assert [(r["area"], r["split_h"]) for r in out] == [(0, 0), (0, 4), (500, 0), (500, 4)]
  assert [r["object"]["num_pred_objects"] for r in out] == [2, 3, 1, 2]
  assert out[0]["pixel"] == out[1]["pixel"] and out[2]["pixel"] == out[3]["pixel"]
  assert out[3]["object"]["f1"] == 1.0
  assert "  4 val" in rescore.format_row(out[1])
  with pytest.raises(ValueError, match="--split_h"):
    rescore.rescore(preds, examples, ["val"], areas=[0], split_hs=[-2])
