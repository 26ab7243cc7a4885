"""Tile grid, patch-level labels and stitching tiles back into whole images.

Implements the reference's patch preparation (docs/reference.md §1, paper §3.1) and the merge of tile
masks into a full-image pseudo-mask (docs/reference.md §3 step 7). All arrays are NumPy, NHWC, and the
tile grid is stored as an int array of top-left corners `(y, x)` in pixels.

Grid: 112×112 tiles at stride 56 along each side; the offsets are 0, stride, 2·stride, … up to
`length - tile`, plus one extra offset at `length - tile` when the stride does not land on it, so the
last tile is flush with the border. A side shorter than the tile gets the single offset 0 and its tiles
are padded at the bottom / right (see `extract_tiles`). A 775×522 (W×H) GlaS image gives
13 × 9 = 117 tiles.
"""

from __future__ import annotations

import numpy as np

TILE = 112
STRIDE = 56


def tile_offsets(length: int, tile: int = TILE, stride: int = STRIDE) -> np.ndarray:
  """Start offsets of the tiles along one side.

  Args:
    length: side length in pixels (>= 1).
    tile: tile side in pixels (>= 1).
    stride: step between tiles in pixels (>= 1).

  Returns:
    int64[n] increasing offsets: 0, stride, … while `<= length - tile`, plus `length - tile` when the
    stride does not reach it exactly (last tile flush with the border). `[0]` when `length <= tile`.
    Examples: (522, 112, 56) -> 9 offsets ending 392, 410; (775, 112, 56) -> 13 ending 616, 663.

  Raises:
    ValueError: a non-positive argument.
  """
  if length < 1 or tile < 1 or stride < 1:
    raise ValueError(f"tile_offsets needs positive length/tile/stride, got {length}, {tile}, {stride}")
  if length <= tile:
    return np.zeros(1, np.int64)
  offsets = np.arange(0, length - tile + 1, stride, dtype=np.int64)
  if offsets[-1] != length - tile:
    offsets = np.append(offsets, length - tile)
  return offsets


def tile_boxes(h: int, w: int, tile: int = TILE, stride: int = STRIDE) -> np.ndarray:
  """Top-left corners of all tiles of an h×w image, row-major (y outer, x inner).

  Returns:
    int64[T, 2] with columns (y, x); T = len(tile_offsets(h)) * len(tile_offsets(w)).
  """
  ys = tile_offsets(h, tile, stride)
  xs = tile_offsets(w, tile, stride)
  yy, xx = np.meshgrid(ys, xs, indexing="ij")
  return np.stack([yy.ravel(), xx.ravel()], axis=1)


def extract_tiles(array: np.ndarray, tile: int = TILE, stride: int = STRIDE,
                  pad_value: int | float = 0) -> np.ndarray:
  """Cuts an image or mask into the tiles of `tile_boxes`.

  Args:
    array: [H, W, ...] any dtype (e.g. uint8[H, W, 3] image or uint8[H, W] mask).
    tile, stride: grid parameters (pixels).
    pad_value: fill for the part of a tile that lies outside the array. This only happens when a side is
      shorter than `tile` (the single tile at offset 0 then extends past the bottom / right border).
      With the default 0, padded mask pixels count as non-gland in `patch_labels`.

  Returns:
    [T, tile, tile, ...] with `array`'s dtype, in `tile_boxes` order.
  """
  array = np.asarray(array)
  if array.ndim < 2:
    raise ValueError(f"extract_tiles needs an array [H, W, ...], got shape {array.shape}")
  h, w = array.shape[:2]
  ph, pw = max(0, tile - h), max(0, tile - w)
  if ph or pw:
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (array.ndim - 2)
    array = np.pad(array, pad, constant_values=pad_value)
  ys = tile_offsets(h, tile, stride)
  xs = tile_offsets(w, tile, stride)
  # Gather rows then columns with index arrays (no Python loop): [ny, tile, nx, tile, ...].
  ry = ys[:, None] + np.arange(tile)[None, :]
  rx = xs[:, None] + np.arange(tile)[None, :]
  out = array[ry[:, :, None, None], rx[None, None, :, :]]
  out = np.moveaxis(out, 2, 1)  # [ny, nx, tile, tile, ...]
  return np.ascontiguousarray(out.reshape((-1, tile, tile) + array.shape[2:]))


def patch_labels(mask_tiles: np.ndarray, threshold: float = 0.05) -> np.ndarray:
  """Multi-hot patch labels [non-gland, gland] of mask tiles (docs/reference.md §1, paper §3.1).

  A class is present when it covers strictly more than `threshold` of the tile's pixels; any instance
  id > 0 counts as gland. With threshold < 0.5 at least one class is always present.

  Args:
    mask_tiles: [T, t, t] integer masks (instance ids or 0/1; 0 = non-gland).
    threshold: fraction in [0, 1).

  Returns:
    uint8[T, 2]: column 0 non-gland present, column 1 gland present (values 0/1).
  """
  mask_tiles = np.asarray(mask_tiles)
  if mask_tiles.ndim != 3:
    raise ValueError(f"patch_labels needs mask tiles [T, t, t], got shape {mask_tiles.shape}")
  if not 0.0 <= threshold < 1.0:
    raise ValueError(f"patch_labels threshold must be in [0, 1), got {threshold}")
  npix = mask_tiles.shape[1] * mask_tiles.shape[2]
  gland = np.count_nonzero(mask_tiles > 0, axis=(1, 2)).astype(np.float64)
  limit = threshold * npix
  return np.stack([(npix - gland) > limit, gland > limit], axis=1).astype(np.uint8)


def example_tiles(example, tile: int = TILE, stride: int = STRIDE, threshold: float = 0.05, *,
                  images: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
  """Tiles and patch labels of one example: the classifier's training / validation / CAM input.

  Args:
    example: anything with `.image` uint8[H, W, 3] and `.mask` [H, W] instance ids (0 = non-gland),
      e.g. an `oeem_jax.data.source.Example`.
    tile, stride: grid parameters in pixels (`tile_boxes` order).
    threshold: patch-label area fraction in [0, 1) (`patch_labels`).
    images: False skips cutting the image (only the labels are wanted); the tiles are then None.

  Returns:
    (image tiles uint8[T, tile, tile, 3] or None, labels uint8[T, 2] [non-gland, gland]), T =
    `len(tile_boxes(H, W, tile, stride))`; tiles past a short side are zero-padded (`extract_tiles`).

  Raises:
    ValueError: a mask that is not 2-D, or a threshold outside [0, 1).
  """
  labels = patch_labels(extract_tiles(example.mask, tile, stride), threshold)
  return (extract_tiles(example.image, tile, stride) if images else None), labels


def _check_tiles(tiles, ndim: int, what: str, boxes, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """`tiles` as an array [T, t, t, ...] with `ndim` dims (`what` names it), `boxes` as int64[T, 2]."""
  tiles = np.asarray(tiles)
  if tiles.ndim != ndim or tiles.shape[1] != tiles.shape[2]:
    raise ValueError(f"{what}, got shape {tiles.shape}")
  return tiles, _check_boxes(boxes, tiles.shape[0], h, w)


def _check_boxes(boxes: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
  boxes = np.asarray(boxes, np.int64)
  if boxes.shape != (n, 2):
    raise ValueError(f"boxes must be int[{n}, 2] (y, x) to match {n} tiles, got shape {boxes.shape}")
  if (boxes < 0).any() or (boxes[:, 0] >= h).any() or (boxes[:, 1] >= w).any():
    raise ValueError(f"boxes must start inside the {h}x{w} (HxW) image")
  return boxes


def _accumulate(tiles: np.ndarray, boxes: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """Sums tiles [T, t, t, C] (float64) into [h, w, C] and counts coverage [h, w]; clips at borders."""
  t = tiles.shape[1]
  total = np.zeros((h, w) + tiles.shape[3:], np.float64)
  count = np.zeros((h, w), np.int64)
  for (y, x), tl in zip(boxes, tiles):
    hh, ww = min(t, h - y), min(t, w - x)
    total[y:y + hh, x:x + ww] += tl[:hh, :ww]
    count[y:y + hh, x:x + ww] += 1
  if (count == 0).any():
    raise ValueError("the tiles do not cover the whole image")
  return total, count


def stitch_scores(tile_scores: np.ndarray, boxes: np.ndarray, h: int, w: int) -> np.ndarray:
  """Full-image scores from tile scores, averaging wherever tiles overlap.

  Args:
    tile_scores: float[T, t, t, C] per-tile maps (e.g. CAM logits or probabilities).
    boxes: int[T, 2] (y, x) top-left corners, e.g. `tile_boxes(h, w, t, stride)`.
    h, w: output size; parts of tiles beyond it (padding) are dropped.

  Returns:
    float32[h, w, C] mean over covering tiles.

  Raises:
    ValueError: shape mismatch, or a pixel no tile covers.
  """
  tile_scores, boxes = _check_tiles(tile_scores, 4, "tile_scores must be [T, t, t, C]", boxes, h, w)
  total, count = _accumulate(tile_scores.astype(np.float64), boxes, h, w)
  return (total / count[..., None]).astype(np.float32)


STITCH_MODES = ("vote", "soft")


def stitch_probabilities(tile_probs: np.ndarray, boxes: np.ndarray, h: int, w: int) -> np.ndarray:
  """Full-image class map from soft tile outputs: mean class probability over covering tiles, argmax.

  The "soft" stitching of `cam.stitch` / `cls.stitch` (docs/results.md: chosen on the validation
  images for the `:cpu` recipe). With one-hot tiles it is `stitch_masks`' majority vote; with soft
  tiles a confident tile (e.g. one whose patch label has one class, probability exactly 0 or 1)
  outweighs uncertain neighbours.

  Args:
    tile_probs: float[T, t, t, C] per-tile class probabilities (each pixel sums to 1), e.g.
      `oeem_jax.method.pseudo_mask.label_masked_softmax`.
    boxes: int[T, 2] (y, x) top-left corners.
    h, w: output size.

  Returns:
    uint8[h, w] class ids; ties go to the lower class id (non-gland for GlaS), as in `stitch_masks`.

  Raises:
    ValueError: shape mismatch, or a pixel no tile covers.
  """
  tile_probs, boxes = _check_tiles(tile_probs, 4, "tile_probs must be [T, t, t, C]", boxes, h, w)
  total, _ = _accumulate(tile_probs.astype(np.float64), boxes, h, w)
  return np.argmax(total, axis=-1).astype(np.uint8)


def stitch(tile_out: np.ndarray, boxes: np.ndarray, h: int, w: int, mode: str) -> np.ndarray:
  """`stitch_masks` (mode "vote": tile_out int[T, t, t] masks) or `stitch_probabilities` (mode
  "soft": tile_out float[T, t, t, C] probabilities); returns uint8[h, w].

  Raises:
    ValueError: an unknown mode, or the errors of the function it calls.
  """
  if mode == "vote":
    return stitch_masks(tile_out, boxes, h, w)
  if mode == "soft":
    return stitch_probabilities(tile_out, boxes, h, w)
  raise ValueError(f"stitch mode must be one of {STITCH_MODES}, got {mode!r}")


def stitch_masks(tile_masks: np.ndarray, boxes: np.ndarray, h: int, w: int) -> np.ndarray:
  """Full-image 0/1 mask from hard tile masks by majority vote, ties to non-gland (0).

  This is docs/reference.md §3 step 7: the mean of the overlapping 0/1 tile masks rounded half-to-even,
  i.e. a pixel is gland iff 2·votes > coverage.

  Args:
    tile_masks: [T, t, t] integer or bool masks; any value > 0 counts as a gland vote.
    boxes: int[T, 2] (y, x) top-left corners.
    h, w: output size.

  Returns:
    uint8[h, w] with values 0/1.

  Raises:
    ValueError: shape mismatch, or a pixel no tile covers.
  """
  tile_masks, boxes = _check_tiles(tile_masks, 3, "tile_masks must be [T, t, t]", boxes, h, w)
  votes, count = _accumulate((tile_masks > 0).astype(np.float64), boxes, h, w)
  return (2 * votes > count).astype(np.uint8)
