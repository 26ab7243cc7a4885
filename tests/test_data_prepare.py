"""Stage `prepare` (oeem_jax.stages.prepare)."""

from __future__ import annotations

import json

import numpy as np

from oeem_jax import stages
from oeem_jax.config.base import get_base_config
from oeem_jax.data import tiles
from oeem_jax.stages import prepare


def test_rgb_stats_hand_worked():
  a = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)   # 1x2
  b = np.array([[[255, 0, 0]]], np.uint8)                   # 1x1
  s = prepare.rgb_stats([a, b])
  np.testing.assert_allclose(s["mean"], [2 / 3, 1 / 3, 1 / 3], atol=1e-5)
  np.testing.assert_allclose(s["std"], [np.sqrt(2) / 3] * 3, atol=1e-5)
  assert s["pixels"] == 3


def test_prepare_stage_on_synthetic(tmp_path, data_cache, synthetic_splits):
  cfg = get_base_config("prepare")
  cfg.data.cache_dir = str(data_cache)  # reuses the session's synthetic build
  summary = stages.run_stage(cfg, tmp_path / "w")
  on_disk = json.loads((tmp_path / "w" / "prepare" / "summary.json").read_text())
  assert on_disk["counts"] == summary["counts"] == {"train": 8, "val": 4, "test_a": 2, "test_b": 2, "test": 4}
  assert on_disk["synthetic"] is True and "SYNTHETIC" in on_disk["data_label"] and "SYNTHETIC" in on_disk["final_line"]
  assert on_disk["image_sizes"] == {"256x192": 16}
  # 256x192: offsets x 0,56,112,144 and y 0,56,80 -> 12 tiles per image
  train = on_disk["splits"]["train"]
  assert train["tiles"] == 8 * 12 and sum(train["labels"].values()) == 96
  assert all(v > 0 for v in train["labels"].values())
  mean = on_disk["rgb_stats"]["train"]["mean"]
  assert mean[0] > mean[1] and mean[2] > mean[1]  # pink/purple H&E-like: little green


def test_tile_summary_on_real_train(glas_splits):
  exs = glas_splits.splits["train"] + glas_splits.splits["val"]
  s = prepare.tile_summary(exs, 112, 56, 0.05)
  # 151 - 80 = 71 + 8 train/val images are 775x522 (117 tiles); the others are counted from their size
  expected = sum(len(tiles.tile_offsets(e.mask.shape[0])) * len(tiles.tile_offsets(e.mask.shape[1])) for e in exs)
  assert s["tiles"] == expected == 9703
  assert sum(s["labels"].values()) == 9703
  assert s["labels"] == {"[1,0]": 1624, "[0,1]": 1123, "[1,1]": 6956}
