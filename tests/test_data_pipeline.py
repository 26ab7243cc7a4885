"""tf.data pipelines: normalisation, index stream, augmentation and exact resume (oeem_jax.data.pipeline)."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from oeem_jax.data import pipeline as P


def _take(ds, n):
  return list(itertools.islice(ds.as_numpy_iterator(), n))


def test_normalize_hand_values_numpy_jax_tf():
  px = np.array([[[[255, 0, 128]]]], np.uint8)  # NHWC
  cls = [(1 - 0.787) / 0.167, (0 - 0.511) / 0.248, (128 / 255 - 0.785) / 0.131]  # 1.27545, -2.06048, -2.16061
  seg = [(255 - 123.675) / 58.395, (0 - 116.28) / 57.12, (128 - 103.53) / 57.375]  # 2.24891, -2.03571, 0.42649
  for arr, back in ((px, np.asarray), (jnp.asarray(px), np.asarray), (tf.constant(px), lambda t: t.numpy())):
    c, s = P.normalize_cls(arr), P.normalize_seg(arr)
    assert type(c) is type(P.normalize_cls(arr)) and back(c).dtype == np.float32 and back(c).shape == (1, 1, 1, 3)
    np.testing.assert_allclose(back(c)[0, 0, 0], cls, rtol=1e-5)
    np.testing.assert_allclose(back(s)[0, 0, 0], seg, rtol=1e-5)
  assert isinstance(P.normalize_cls(jnp.asarray(px)), jnp.ndarray)
  assert isinstance(P.normalize_seg(tf.constant(px)), tf.Tensor)


def test_element_indices_are_per_epoch_permutations():
  idx = P.element_indices(5, seed=0, start=0, count=15)
  for e in range(3):
    np.testing.assert_array_equal(idx[5 * e:5 * e + 5], P.epoch_permutation(5, 0, e))
    assert sorted(idx[5 * e:5 * e + 5]) == list(range(5))
  assert len({tuple(idx[5 * e:5 * e + 5]) for e in range(3)}) > 1
  np.testing.assert_array_equal(P.element_indices(5, 0, 7, 5), idx[7:12])
  assert not np.array_equal(P.element_indices(50, 1, 0, 50), P.element_indices(50, 2, 0, 50))


def _const_tiles(n=7, t=24):
  colours = np.array([[30 * k, 255 - 30 * k, (70 * k) % 256] for k in range(n)], np.uint8)
  tiles = np.broadcast_to(colours[:, None, None, :], (n, t, t, 3)).copy()
  labels = np.array([[1, 0], [0, 1], [1, 1]] * 3, np.uint8)[:n]
  return tiles, labels, colours


def test_cls_dataset_follows_the_index_stream():
  tiles, labels, colours = _const_tiles()
  batches = _take(P.cls_dataset(tiles, labels, input_size=32, global_batch_size=4, seed=5), 4)
  idx = P.element_indices(7, 5, 0, 16).reshape(4, 4)
  for b, ids in zip(batches, idx):
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (4, 2) and b["label"].dtype == np.float32
    np.testing.assert_array_equal(b["label"], labels[ids].astype(np.float32))
    # a constant tile stays constant through crop/resize/flip: recover which tile each element is
    expected = P.normalize_cls(colours[ids])[:, None, None, :]
    np.testing.assert_allclose(b["image"], np.broadcast_to(expected, b["image"].shape), atol=1e-4)


def test_random_resized_crop_box_ranges():
  for i in range(200):
    s = tf.random.experimental.stateless_split(tf.constant([3, i], tf.int64), 3)
    y, x, h, w = P.random_resized_crop_box(s, 112, 112).numpy()
    assert 0 <= y and 0 <= x and y + h <= 112 and x + w <= 112
    assert 0.69 <= h * w / 112 ** 2 <= 1.0
    assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_cls_flips_both_ways():
  t = 32
  lr = np.zeros((1, t, t, 3), np.uint8)
  lr[:, :, t // 2:] = 255     # bright right half
  tb = np.zeros((1, t, t, 3), np.uint8)
  tb[:, t // 2:] = 255        # bright bottom half
  lab = np.array([[1, 1]], np.uint8)
  seen_h, seen_v = set(), set()
  for b in _take(P.cls_dataset(lr, lab, input_size=t, global_batch_size=8, seed=0), 3):
    for im in b["image"]:
      seen_h.add(bool(im[:, : t // 4].mean() < im[:, -t // 4:].mean()))
  for b in _take(P.cls_dataset(tb, lab, input_size=t, global_batch_size=8, seed=0), 3):
    for im in b["image"]:
      seen_v.add(bool(im[: t // 4].mean() < im[-t // 4:].mean()))
  assert seen_h == {True, False} and seen_v == {True, False}


def _check_resume_and_processes(make):
  full = _take(make(start_step=0, process_index=0, process_count=1), 6)
  resumed = _take(make(start_step=3, process_index=0, process_count=1), 3)
  p0 = _take(make(start_step=0, process_index=0, process_count=2), 3)
  p1 = _take(make(start_step=0, process_index=1, process_count=2), 3)
  for a, b in zip(full[3:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for a, b, c in zip(p0, p1, full):
    for k in c:
      assert a[k].shape[0] == c[k].shape[0] // 2
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), c[k])
  assert not np.array_equal(full[0]["image"], full[1]["image"])


def test_cls_exact_resume_and_process_slices():
  rng = np.random.default_rng(0)
  tiles = rng.integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)
  labels = rng.integers(0, 2, (5, 2)).astype(np.uint8)
  _check_resume_and_processes(lambda **kw: P.cls_dataset(tiles, labels, input_size=24, global_batch_size=4,
                                                         seed=11, **kw))
  a = _take(P.cls_dataset(tiles, labels, input_size=24, global_batch_size=4, seed=11), 1)[0]
  b = _take(P.cls_dataset(tiles, labels, input_size=24, global_batch_size=4, seed=12), 1)[0]
  assert not np.array_equal(a["image"], b["image"])
  with pytest.raises(ValueError, match="divisible"):
    P.cls_dataset(tiles, labels, global_batch_size=3, seed=0, process_count=2)


def _seg_data(n=3, h=40, w=48):
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (h + 4 * k, w + 2 * k, 3), dtype=np.uint8) for k in range(n)]
  masks = [(rng.random(im.shape[:2]) > 0.5).astype(np.uint8) for im in images]
  masks[0][:3, :3] = 255
  return images, masks


def test_seg_shapes_values_and_resume():
  images, masks = _seg_data()
  ds = P.seg_dataset(images, masks, crop_size=32, global_batch_size=4, seed=2)
  b = _take(ds, 1)[0]
  assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["mask"].shape == (4, 32, 32) and b["mask"].dtype == np.int32
  assert set(np.unique(b["mask"])) <= {0, 1, 255}
  lo, hi = P.normalize_seg(np.array([0, 0, 0])), P.normalize_seg(np.array([255, 255, 255]))
  assert (b["image"] >= lo.min() - 1e-5).all() and (b["image"] <= hi.max() + 1e-5).all()
  _check_resume_and_processes(lambda **kw: P.seg_dataset(images, masks, crop_size=32, global_batch_size=4,
                                                         seed=2, **kw))


def test_seg_geometry_without_photometric():
  rng = np.random.default_rng(2)
  img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  m = (rng.random((32, 32)) > 0.5).astype(np.uint8)
  # scale 1 and crop = image: the output is the image (or its horizontal flip), normalised
  flips = set()
  for b in _take(P.seg_dataset([img], [m], crop_size=32, scale_range=(1.0, 1.0), global_batch_size=4, seed=0,
                               photometric=False), 2):
    for im, mk in zip(b["image"], b["mask"]):
      flip = bool(np.array_equal(mk, m[:, ::-1])) and not np.array_equal(mk, m)
      flips.add(flip)
      ref = img[:, ::-1] if flip else img
      np.testing.assert_allclose(im, P.normalize_seg(ref), atol=1e-4)
      np.testing.assert_array_equal(mk, m[:, ::-1] if flip else m)
  assert flips == {True, False}
  # scale 2: a 16x16 mask becomes a nearest-neighbour 2x upsample
  small = m[:16, :16]
  for b in _take(P.seg_dataset([img[:16, :16]], [small], crop_size=32, scale_range=(2.0, 2.0), global_batch_size=4,
                               seed=0, photometric=False), 1):
    up = np.repeat(np.repeat(small, 2, 0), 2, 1)
    for mk in b["mask"]:
      assert np.array_equal(mk, up) or np.array_equal(mk, up[:, ::-1])


def test_seg_padding_bottom_right():
  images, masks = _seg_data(n=1)  # 40x48 -> scale 0.5 -> 20x24 valid inside a 32x32 crop
  for b in _take(P.seg_dataset(images, masks, crop_size=32, scale_range=(0.5, 0.5), global_batch_size=8, seed=4), 1):
    assert (b["mask"][:, 20:, :] == 255).all() and (b["mask"][:, :, 24:] == 255).all()
    assert (b["image"][:, 20:, :] == 0).all() and (b["image"][:, :, 24:] == 0).all()
    valid = b["mask"][:, :20, :24]
    assert ((valid == 0) | (valid == 1) | (valid == 255)).all() and (valid != 255).mean() > 0.9


def test_photometric_keeps_gray_gray_and_changes_colour():
  gray = tf.constant(np.broadcast_to(np.linspace(0, 255, 64, dtype=np.float32)[:, None, None], (64, 4, 3)))
  colour = tf.constant(np.random.default_rng(0).uniform(0, 255, (8, 8, 3)).astype(np.float32))
  changed = 0
  for i in range(12):
    seeds = tf.random.experimental.stateless_split(tf.constant([0, i], tf.int64), 7)
    out = P.photometric_distortion(gray, seeds).numpy()
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-3)
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-3)
    assert out.min() >= 0 and out.max() <= 255
    changed += not np.allclose(P.photometric_distortion(colour, seeds).numpy(), colour.numpy(), atol=1e-3)
  assert 6 <= changed <= 12  # 1 - 0.5^4 of the draws change something


def test_seg_rejects_instance_masks():
  images, masks = _seg_data(n=1)
  masks[0][0, 0] = 2
  with pytest.raises(ValueError, match=r"masks\[0\] has values other than 0, 1 and 255"):
    P.seg_dataset(images, masks, global_batch_size=2, seed=0)
