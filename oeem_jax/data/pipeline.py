"""tf.data input pipelines for the classification (tiles) and segmentation (crops) stages.

Both streams are a pure function of (seed, step), which is what exact resume relies on:

* Global element i (i = step · global_batch_size + position in the batch) uses example
  `perm_e[i mod N]`, where `perm_e = numpy.random.default_rng([seed, e]).permutation(N)` and the epoch is
  `e = i // N` (see `element_indices`). Epochs therefore reshuffle without ever repeating an example
  within an epoch.
* Its augmentation draws every random number with TF stateless ops seeded from `(seed, i)`.
* Process p of P takes the contiguous slice `[p·B/P, (p+1)·B/P)` of every global batch of size B, so
  concatenating all processes' batches gives the single-process batch.
* `start_step=k` starts the stream at global element k·B: the batches are exactly those an
  uninterrupted stream yields from step k on.

Examples are fed from host NumPy arrays by a Python generator (only the example itself crosses into
TF, nothing big is baked into the graph); augmentation runs in a parallel, order-preserving `map`;
batches are `drop_remainder` and prefetched. Streams are infinite.

Input normalisation (the network contract) lives in `oeem_jax.models.network`.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from oeem_jax.models.network import Stats, normalize_cls, normalize_seg

IGNORE_INDEX = 255


# ----------------------------------------------------------------------------------------------
# The index stream.
# ----------------------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """int64[n]: the example order of `epoch` (NumPy PCG64 seeded with [seed, epoch])."""
  return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def element_indices(n: int, seed: int, start: int, count: int) -> np.ndarray:
  """Example index of global elements start, …, start + count - 1 (the stream's definition).

  Returns:
    int64[count] values in [0, n).
  """
  out = np.empty(count, np.int64)
  for k in range(count):
    e, pos = divmod(start + k, n)
    if k == 0 or pos == 0:
      perm = epoch_permutation(n, seed, e)
    out[k] = perm[pos]
  return out


def _local_batch(global_batch_size: int, process_index: int, process_count: int) -> int:
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
  return global_batch_size // process_count


def _element_stream(n: int, seed: int, global_batch_size: int, start_step: int, process_index: int,
                    process_count: int) -> Iterator[tuple[int, int]]:
  """Yields (global element index i, example index) for this process's slice of every batch."""
  local = _local_batch(global_batch_size, process_index, process_count)
  lo = process_index * local
  step = start_step
  cached_epoch, perm = -1, None
  while True:
    base = step * global_batch_size
    for j in range(lo, lo + local):
      i = base + j
      e, pos = divmod(i, n)
      if e != cached_epoch:
        cached_epoch, perm = e, epoch_permutation(n, seed, e)
      yield i, int(perm[pos])
    step += 1


def _check_seed(seed: int, start_step: int) -> None:
  if seed < 0:
    raise ValueError(f"seed must be >= 0 (NumPy SeedSequence), got {seed}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")


def _finish(ds: tf.data.Dataset, local_batch: int) -> tf.data.Dataset:
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  opts = tf.data.Options()
  opts.deterministic = True
  return ds.with_options(opts)


def _seeds(seed: int, i, num: int) -> tf.Tensor:
  """[num, 2] int64 stateless seeds derived from (seed, i)."""
  base = tf.stack([tf.constant(seed, tf.int64), tf.cast(i, tf.int64)])
  return tf.random.experimental.stateless_split(base, num=num)


def _u(seed, lo: float = 0.0, hi: float = 1.0, shape=()) -> tf.Tensor:
  return tf.random.stateless_uniform(shape, seed=seed, minval=lo, maxval=hi, dtype=tf.float32)


# ----------------------------------------------------------------------------------------------
# Classification.
# ----------------------------------------------------------------------------------------------


def random_resized_crop_box(seeds: tf.Tensor, h: int, w: int, scale=(0.7, 1.0),
                            ratio=(3.0 / 4.0, 4.0 / 3.0), attempts: int = 10) -> tf.Tensor:
  """torchvision RandomResizedCrop's box, drawn statelessly: int32[4] (y, x, height, width).

  Up to `attempts` candidates: area fraction ~ U(scale), log aspect ~ U(log ratio), w = round(sqrt(A·r)),
  h = round(sqrt(A/r)); the first that fits gets a uniform position. If none fits, a centre crop with
  the aspect clamped into `ratio`. `seeds`: int64[3, 2].
  """
  area = float(h * w)
  target = area * _u(seeds[0], scale[0], scale[1], (attempts,))
  log_r = _u(seeds[1], math.log(ratio[0]), math.log(ratio[1]), (attempts,))
  aspect = tf.exp(log_r)
  cw = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  ch = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  # centre-crop fallback
  in_ratio = w / h
  if in_ratio < ratio[0]:
    fw, fh = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    fw, fh = int(round(h * ratio[1])), h
  else:
    fw, fh = w, h
  any_ok = tf.reduce_any(ok)
  bh = tf.where(any_ok, ch[first], fh)
  bw = tf.where(any_ok, cw[first], fw)
  pos = _u(seeds[2], shape=(2,))
  y = tf.where(any_ok, tf.cast(tf.floor(pos[0] * tf.cast(h - bh + 1, tf.float32)), tf.int32), (h - fh) // 2)
  x = tf.where(any_ok, tf.cast(tf.floor(pos[1] * tf.cast(w - bw + 1, tf.float32)), tf.int32), (w - fw) // 2)
  return tf.stack([y, x, bh, bw])


def augment_tile(tile: tf.Tensor, seed: int, i, input_size: int = 224, scale=(0.7, 1.0),
                 ratio=(3.0 / 4.0, 4.0 / 3.0), stats: Stats | None = None) -> tf.Tensor:
  """Classification augmentation of one tile (docs/reference.md §2 "Training"), seeded by (seed, i).

  RandomResizedCrop (scale, aspect `ratio`) resized bilinearly (half-pixel centres, no antialias) to
  `input_size`, horizontal flip p=0.5, vertical flip p=0.5, `normalize_cls`.

  Args:
    tile: uint8[t, t, 3] with static shape.

  Returns:
    float32[input_size, input_size, 3].
  """
  h, w = int(tile.shape[0]), int(tile.shape[1])
  s = _seeds(seed, i, 5)
  box = random_resized_crop_box(s[:3], h, w, scale, ratio)
  crop = tf.slice(tile, [box[0], box[1], 0], [box[2], box[3], 3])
  x = tf.image.resize(tf.cast(crop, tf.float32), (input_size, input_size), method="bilinear", antialias=False)
  flips = _u(s[3], shape=(2,))
  x = tf.cond(flips[0] < 0.5, lambda: tf.reverse(x, [1]), lambda: x)
  x = tf.cond(flips[1] < 0.5, lambda: tf.reverse(x, [0]), lambda: x)
  x.set_shape((input_size, input_size, 3))
  return normalize_cls(x, stats)


def cls_dataset(tiles: np.ndarray, labels: np.ndarray, *, input_size: int = 224, global_batch_size: int,
                seed: int, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                scale: tuple[float, float] = (0.7, 1.0),
                ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
                stats: Stats | None = None) -> tf.data.Dataset:
  """Infinite classification stream of augmented tiles (paper §3.1, docs/reference.md §2).

  Args:
    tiles: uint8[T, t, t, 3] training tiles (e.g. 112×112 from `tiles.extract_tiles`).
    labels: uint8[T, 2] multi-hot [non-gland, gland] (`tiles.patch_labels`).
    input_size: model input side S (224 in the paper).
    global_batch_size: B over all processes; must be divisible by `process_count`.
    seed: >= 0; the stream is a pure function of (seed, step) (module docstring).
    start_step: first global step to produce (exact resume).
    process_index, process_count: this host's slice of each global batch (`jax.process_index()`,
      `jax.process_count()`).
    stats: (mean, std) on 0..255 RGB for `normalize_cls` (None = GlaS statistics; `input_stats`).

  Returns:
    tf.data.Dataset of {"image": float32[B/P, S, S, 3] (normalize_cls), "label": float32[B/P, 2]}.

  Raises:
    ValueError: bad shapes/dtypes, empty input, indivisible batch, negative seed or start_step.
  """
  tiles = np.asarray(tiles)
  labels = np.asarray(labels)
  if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
    raise ValueError(f"tiles must be uint8[T, t, t, 3], got {tiles.dtype}{list(tiles.shape)}")
  if labels.shape != (tiles.shape[0], 2):
    raise ValueError(f"labels must be [T={tiles.shape[0]}, 2], got shape {labels.shape}")
  if tiles.shape[0] == 0:
    raise ValueError("cls_dataset needs at least one tile")
  _check_seed(seed, start_step)
  local = _local_batch(global_batch_size, process_index, process_count)
  n = tiles.shape[0]
  labels_f = labels.astype(np.float32)

  def gen():
    for i, idx in _element_stream(n, seed, global_batch_size, start_step, process_index, process_count):
      yield i, tiles[idx], labels_f[idx]

  ds = tf.data.Dataset.from_generator(gen, output_signature=(
      tf.TensorSpec((), tf.int64), tf.TensorSpec(tiles.shape[1:], tf.uint8), tf.TensorSpec((2,), tf.float32)))

  def aug(i, tile, label):
    return {"image": augment_tile(tile, seed, i, input_size, scale, ratio, stats), "label": label}

  ds = ds.map(aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, local)


# ----------------------------------------------------------------------------------------------
# Segmentation.
# ----------------------------------------------------------------------------------------------


def photometric_distortion(x: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
  """mmseg PhotoMetricDistortion as in docs/reference.md §4 on float RGB in 0..255, seeded statelessly.

  Each step with p = 0.5: brightness += U(-32, 32); contrast ×= U(0.5, 1.5), applied first or last
  (p = 0.5 each); saturation ×= U(0.5, 1.5) in HSV (clamped to [0, 1]); hue shifted by
  randint(-18, 18) OpenCV units (2° each, i.e. delta k/180 of the circle). Values are clipped to
  [0, 255] after brightness and contrast. Unlike mmseg, intermediate values are not truncated to uint8.

  Args:
    x: float32[H, W, 3] in 0..255.
    seeds: int64[7, 2].

  Returns:
    float32[H, W, 3] in 0..255.
  """
  apply = _u(seeds[0], shape=(5,)) < 0.5  # brightness, contrast, saturation, hue, contrast-first
  beta = _u(seeds[1], -32.0, 32.0)
  alpha_c = _u(seeds[2], 0.5, 1.5)
  alpha_s = _u(seeds[3], 0.5, 1.5)
  hue = tf.random.stateless_uniform((), seed=seeds[4], minval=-18, maxval=18, dtype=tf.int32)

  def contrast(v):
    return tf.cond(apply[1], lambda: tf.clip_by_value(v * alpha_c, 0.0, 255.0), lambda: v)

  x = tf.cond(apply[0], lambda: tf.clip_by_value(x + beta, 0.0, 255.0), lambda: x)
  x = tf.cond(apply[4], lambda: contrast(x), lambda: x)
  x = tf.cond(apply[2], lambda: tf.image.adjust_saturation(x / 255.0, alpha_s) * 255.0, lambda: x)
  x = tf.cond(apply[3], lambda: tf.image.adjust_hue(x / 255.0, tf.cast(hue, tf.float32) / 180.0) * 255.0,
              lambda: x)
  x = tf.cond(apply[4], lambda: x, lambda: contrast(x))
  return tf.clip_by_value(x, 0.0, 255.0)


def _scaled_window(length: tf.Tensor, r: tf.Tensor, crop: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(window length in the original, output length) along one side for scale r and crop size."""
  lf = tf.cast(length, tf.float32)
  scaled = tf.maximum(tf.cast(tf.floor(lf * r + 0.5), tf.int32), 1)
  big = scaled >= crop
  win = tf.minimum(tf.maximum(tf.cast(tf.floor(crop / r + 0.5), tf.int32), 1), length)
  return tf.where(big, win, length), tf.where(big, crop, scaled)


def augment_seg(image: tf.Tensor, mask: tf.Tensor, seed: int, i, crop_size: int = 256,
                scale_range: tuple[float, float] = (0.75, 3.0), photometric: bool = True,
                stats: Stats | None = None) -> tuple[tf.Tensor, tf.Tensor]:
  """Segmentation augmentation of one full image (docs/reference.md §4, augmentation), seeded by (seed, i).

  1.-2. random scale r ~ U(scale_range) and random crop_size crop, computed as "crop a window of
     round(crop/r) pixels per side of the original at a uniform integer offset, then resize it to
     crop" (bilinear for the image, nearest for the mask, half-pixel centres, no antialias). The
     effective scale per side is crop/window, within 0.5/window of r (0.6 % at r = 3). When the scaled
     image, round(L·r), is shorter than the crop along a side, the whole side is used and resized to
     round(L·r) (then padded, step 6), as mmseg's Resize + RandomCrop + Pad do;
  3. horizontal flip p = 0.5 (of the unpadded part, so padding stays bottom/right as in mmseg);
  4. `photometric_distortion` (if `photometric`); 5. `normalize_seg`;
  6. pad to crop_size: image 0 (after normalisation, like mmseg's Pad) and mask 255.

  Args:
    image: uint8[H, W, 3]; mask: uint8[H, W] (0/1, 255 = ignore).

  Returns:
    (float32[crop, crop, 3], int32[crop, crop] with 255 = ignore/pad).
  """
  s = _seeds(seed, i, 11)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  r = _u(s[0], scale_range[0], scale_range[1])
  wy, oh = _scaled_window(h, r, crop_size)
  wx, ow = _scaled_window(w, r, crop_size)
  off = _u(s[1], shape=(2,))
  y0 = tf.cast(tf.floor(off[0] * tf.cast(h - wy + 1, tf.float32)), tf.int32)
  x0 = tf.cast(tf.floor(off[1] * tf.cast(w - wx + 1, tf.float32)), tf.int32)
  img = tf.image.resize(image[y0:y0 + wy, x0:x0 + wx], tf.stack([oh, ow]), method="bilinear",
                        antialias=False)
  msk = tf.image.resize(mask[y0:y0 + wy, x0:x0 + wx, None], tf.stack([oh, ow]), method="nearest")[..., 0]
  flip = _u(s[2]) < 0.5
  img = tf.cond(flip, lambda: tf.reverse(img, [1]), lambda: img)
  msk = tf.cond(flip, lambda: tf.reverse(msk, [1]), lambda: msk)
  if photometric:
    img = photometric_distortion(img, s[3:10])
  img = normalize_seg(img, stats)
  pad = [[0, crop_size - oh], [0, crop_size - ow]]
  img = tf.pad(img, pad + [[0, 0]])
  msk = tf.pad(tf.cast(msk, tf.int32), pad, constant_values=IGNORE_INDEX)
  img.set_shape((crop_size, crop_size, 3))
  msk.set_shape((crop_size, crop_size))
  return img, msk


def seg_dataset(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, crop_size: int = 256,
                scale_range: tuple[float, float] = (0.75, 3.0), global_batch_size: int, seed: int,
                start_step: int = 0, process_index: int = 0, process_count: int = 1,
                photometric: bool = True, stats: Stats | None = None) -> tf.data.Dataset:
  """Infinite segmentation stream of augmented crops (docs/reference.md §4 "Training pipeline").

  Args:
    images: N arrays uint8[H_n, W_n, 3] (sizes may differ).
    masks: N arrays uint8[H_n, W_n] class masks with values 0/1 (255 = ignore), e.g. true masks `> 0` or
      pseudo-masks.
    crop_size: output side (256 in the reference).
    scale_range: range of the random rescale factor r relative to the original image.
    global_batch_size, seed, start_step, process_index, process_count: as `cls_dataset`.
    photometric: apply `photometric_distortion` (the reference does).
    stats: (mean, std) on 0..255 RGB for `normalize_seg` (None = ImageNet statistics; `input_stats`).

  Returns:
    tf.data.Dataset of {"image": float32[B/P, crop, crop, 3] (normalize_seg; 0 in padding),
    "mask": int32[B/P, crop, crop] (0/1, 255 = ignore or padding)}.

  Raises:
    ValueError: empty input, mismatched lengths/shapes, wrong dtype, mask values other than 0/1/255,
      indivisible batch, negative seed or start_step.
  """
  if len(images) != len(masks):
    raise ValueError(f"got {len(images)} images but {len(masks)} masks")
  if not images:
    raise ValueError("seg_dataset needs at least one image")
  images = [np.asarray(im) for im in images]
  masks = [np.asarray(m) for m in masks]
  for k, (im, m) in enumerate(zip(images, masks)):
    if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
      raise ValueError(f"images[{k}] must be uint8[H, W, 3], got {im.dtype}{list(im.shape)}")
    if m.ndim != 2 or m.shape != im.shape[:2]:
      raise ValueError(f"masks[{k}] must be [H, W] = {list(im.shape[:2])}, got shape {list(m.shape)}")
    if ((m != 0) & (m != 1) & (m != IGNORE_INDEX)).any():
      raise ValueError(f"masks[{k}] has values other than 0, 1 and 255; expected a class mask "
                       "(use instance_mask > 0)")
  _check_seed(seed, start_step)
  local = _local_batch(global_batch_size, process_index, process_count)
  masks = [m.astype(np.uint8) for m in masks]

  def gen():
    for i, idx in _element_stream(len(images), seed, global_batch_size, start_step, process_index,
                                  process_count):
      yield i, images[idx], masks[idx]

  ds = tf.data.Dataset.from_generator(gen, output_signature=(
      tf.TensorSpec((), tf.int64), tf.TensorSpec((None, None, 3), tf.uint8),
      tf.TensorSpec((None, None), tf.uint8)))

  def aug(i, image, mask):
    img, msk = augment_seg(image, mask, seed, i, crop_size, scale_range, photometric, stats)
    return {"image": img, "mask": msk}

  ds = ds.map(aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, local)
