"""Tile grid, patch labels and stitching (oeem_jax.data.tiles)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from oeem_jax.data import tiles


def test_tile_offsets_reference_examples():
  np.testing.assert_array_equal(tiles.tile_offsets(522), [0, 56, 112, 168, 224, 280, 336, 392, 410])
  np.testing.assert_array_equal(tiles.tile_offsets(775), list(range(0, 617, 56)) + [663])
  np.testing.assert_array_equal(tiles.tile_offsets(224), [0, 56, 112])  # stride lands on the border
  np.testing.assert_array_equal(tiles.tile_offsets(112), [0])
  np.testing.assert_array_equal(tiles.tile_offsets(50), [0])  # shorter than a tile: one padded tile
  np.testing.assert_array_equal(tiles.tile_offsets(10, tile=4, stride=3), [0, 3, 6])
  np.testing.assert_array_equal(tiles.tile_offsets(11, tile=4, stride=3), [0, 3, 6, 7])
  with pytest.raises(ValueError):
    tiles.tile_offsets(0)


def test_tile_boxes_775x522_gives_117():
  boxes = tiles.tile_boxes(522, 775)
  assert boxes.shape == (117, 2)
  np.testing.assert_array_equal(boxes[0], [0, 0])
  np.testing.assert_array_equal(boxes[12], [0, 663])  # row-major: 13 tiles along x
  np.testing.assert_array_equal(boxes[13], [56, 0])
  np.testing.assert_array_equal(boxes[-1], [410, 663])


def test_extract_tiles_matches_slicing_and_pads():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)
  t = tiles.extract_tiles(a, tile=4, stride=3)
  boxes = tiles.tile_boxes(9, 11, 4, 3)
  assert t.shape == (len(boxes), 4, 4, 3) and t.dtype == np.uint8
  for k, (y, x) in enumerate(boxes):
    np.testing.assert_array_equal(t[k], a[y:y + 4, x:x + 4])
  # a side shorter than the tile: one tile at 0, padded bottom/right with pad_value
  m = np.arange(6, dtype=np.int32).reshape(2, 3) + 1
  t = tiles.extract_tiles(m, tile=4, stride=2, pad_value=-1)
  assert t.shape == (1, 4, 4)
  np.testing.assert_array_equal(t[0], [[1, 2, 3, -1], [4, 5, 6, -1], [-1] * 4, [-1] * 4])


def test_patch_labels_threshold_is_strict():
  # 10x10 tiles, threshold 5 %: a class needs more than 5 pixels.
  t = np.zeros((5, 10, 10), np.uint8)
  t[1].flat[:5] = 1    # 5 gland pixels: not > 5 %
  t[2].flat[:6] = 3    # 6 pixels of instance 3: gland present
  t[3].flat[:95] = 7   # 5 background pixels left: non-gland absent
  t[4].flat[:94] = 1   # 6 background pixels: both
  np.testing.assert_array_equal(tiles.patch_labels(t, 0.05), [[1, 0], [1, 0], [1, 1], [0, 1], [1, 1]])
  assert tiles.patch_labels(t, 0.05).dtype == np.uint8
  np.testing.assert_array_equal(tiles.patch_labels(t, 0.0)[1], [1, 1])


def test_stitch_masks_majority_ties_to_non_gland():
  # 2x2 tiles at stride 1 over a 2x3 image: columns covered by (A), (A, B), (B).
  boxes = np.array([[0, 0], [0, 1]])
  np.testing.assert_array_equal(tiles.stitch_masks(np.stack([np.ones((2, 2)), np.zeros((2, 2))]), boxes, 2, 3),
                                [[1, 0, 0], [1, 0, 0]])
  # three votes 2:1 -> gland
  boxes = np.array([[0, 0], [0, 1], [0, 2]])
  votes = np.stack([np.ones((2, 2)), np.ones((2, 2)), np.zeros((2, 2))])
  np.testing.assert_array_equal(tiles.stitch_masks(votes, boxes, 2, 4), [[1, 1, 0, 0]] * 2)


def test_stitch_scores_averages_overlaps():
  boxes = np.array([[0, 0], [0, 1]])
  s = np.stack([np.full((2, 2, 1), 1.0), np.full((2, 2, 1), 4.0)])
  out = tiles.stitch_scores(s, boxes, 2, 3)
  assert out.dtype == np.float32 and out.shape == (2, 3, 1)
  np.testing.assert_allclose(out[..., 0], [[1.0, 2.5, 4.0]] * 2)
  with pytest.raises(ValueError, match="cover"):
    tiles.stitch_scores(s[:1], boxes[:1], 2, 3)


def _reference_offsets(length: int) -> list[int]:
  # docs/reference.md §1: 0, 56, ... up to L-112, plus L-112 when L % 56 != 0.
  offs = list(range(0, length - 112 + 1, 56))
  if length % 56 != 0:
    offs.append(length - 112)
  return offs


@pytest.mark.parametrize("name", ["train_1", "train_41"])
def test_real_patch_labels_match_plain_loop(glas_dir, name):
  mask = np.array(Image.open(glas_dir / f"{name}_anno.png"))
  h, w = mask.shape
  expected = []
  for y in _reference_offsets(h):
    for x in _reference_offsets(w):
      crop = mask[y:y + 112, x:x + 112]
      gland = 0
      for v in crop.ravel():  # slow on purpose: independent of the vectorised code
        gland += int(v > 0)
      frac = gland / crop.size
      expected.append([int(1 - frac > 0.05), int(frac > 0.05)])
  got = tiles.patch_labels(tiles.extract_tiles(mask), 0.05)
  if (h, w) == (522, 775):
    assert got.shape == (117, 2)
  np.testing.assert_array_equal(got, np.array(expected, np.uint8))
  assert got.sum(1).min() >= 1


def test_real_stitch_round_trip_exact(glas_dir):
  mask = np.array(Image.open(glas_dir / "train_36_anno.png"))  # 589x453
  binary = (mask > 0).astype(np.uint8)
  h, w = binary.shape
  boxes = tiles.tile_boxes(h, w)
  np.testing.assert_array_equal(tiles.stitch_masks(tiles.extract_tiles(binary), boxes, h, w), binary)
  onehot = np.eye(2, dtype=np.float32)[binary]
  np.testing.assert_array_equal(tiles.stitch_scores(tiles.extract_tiles(onehot), boxes, h, w), onehot)


def test_example_tiles_is_tiles_and_labels_of_one_example():
  # A 40x150 example (one side shorter than the tile): image tiles as extract_tiles, labels from the
  # instance ids (any id > 0 is gland), the same labels without cutting the image.
  from types import SimpleNamespace
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (40, 150, 3), dtype=np.uint8)
  mask = np.zeros((40, 150), np.uint8)
  mask[5:30, 10:60] = 1
  mask[10:40, 100:150] = 7
  ex = SimpleNamespace(image=image, mask=mask)
  t, labels = tiles.example_tiles(ex, 32, 16, 0.2)
  np.testing.assert_array_equal(t, tiles.extract_tiles(image, 32, 16))
  np.testing.assert_array_equal(labels, tiles.patch_labels(tiles.extract_tiles(mask > 0, 32, 16), 0.2))
  assert t.dtype == np.uint8 and labels.dtype == np.uint8
  assert t.shape == (len(tiles.tile_boxes(40, 150, 32, 16)), 32, 32, 3)
  none, same = tiles.example_tiles(ex, 32, 16, 0.2, images=False)
  assert none is None
  np.testing.assert_array_equal(same, labels)
  small = SimpleNamespace(image=image[:20, :20], mask=mask[:20, :20])
  t, labels = tiles.example_tiles(small)  # 112 tiles, stride 56, threshold 0.05: one padded tile, whose
  assert t.shape == (1, 112, 112, 3) and labels.tolist() == [[1, 0]]  # 150 gland pixels are 1.2 % of it


def test_stitch_probabilities_hand_example_confident_tile_outweighs_two_uncertain():
  # 1x1 "tiles" of 3 pixels wide at x = 0, 1, 2 over a 1x4 image: pixel 2 is covered by all three.
  boxes = np.array([[0, 0], [0, 1], [0, 2]])
  p_gland = np.array([[[0.4, 0.4]], [[0.4, 0.4]], [[1.0, 1.0]]])[..., None]  # [T, 1, 2, 1]
  probs = np.concatenate([1 - p_gland, p_gland], axis=-1)
  # Tiles are 1x2 here: pad to square 2x2 tiles (rows beyond h=1 are dropped by the stitcher).
  probs = np.concatenate([probs, probs], axis=1)
  got = tiles.stitch_probabilities(probs, boxes, 1, 4)
  # pixel 0: tile0 only (0.4) -> 0; pixel 1: tiles 0,1 (0.4, 0.4) -> 0;
  # pixel 2: tiles 1,2 (0.4, 1.0), mean 0.7 -> 1; pixel 3: tile2 (1.0) -> 1.
  np.testing.assert_array_equal(got, [[0, 0, 1, 1]])
  # The majority vote of the same tiles' argmax masks gives pixel 2 a 1:1 tie -> non-gland.
  np.testing.assert_array_equal(tiles.stitch_masks(probs[..., 1] > 0.5, boxes, 1, 4), [[0, 0, 0, 1]])
  # An exact tie of probabilities goes to class 0.
  half = np.full((1, 2, 2, 2), 0.5)
  np.testing.assert_array_equal(tiles.stitch_probabilities(half, np.array([[0, 0]]), 2, 2), np.zeros((2, 2)))


def test_stitch_probabilities_of_one_hot_tiles_is_the_majority_vote():
  rng = np.random.default_rng(0)
  h, w = 150, 190
  boxes = tiles.tile_boxes(h, w, 112, 56)
  masks = (rng.random((len(boxes), 112, 112)) < 0.5).astype(np.uint8)
  one_hot = np.eye(2)[masks]
  np.testing.assert_array_equal(tiles.stitch(one_hot, boxes, h, w, "soft"), tiles.stitch(masks, boxes, h, w, "vote"))
  np.testing.assert_array_equal(tiles.stitch(masks, boxes, h, w, "vote"), tiles.stitch_masks(masks, boxes, h, w))
  with pytest.raises(ValueError, match="stitch mode must be one of"):
    tiles.stitch(masks, boxes, h, w, "mean")
  with pytest.raises(ValueError, match=r"tile_probs must be \[T, t, t, C\]"):
    tiles.stitch_probabilities(masks, boxes, h, w)


def test_stitch_modes_match_config_check():
  from oeem_jax.config import check as config_check
  assert config_check.STITCH_MODES == tiles.STITCH_MODES
