"""Multi-scale CAM -> label-masked argmax pseudo-masks for 112x112 tiles (docs/reference.md §3, paper Eq. 1-2).

Pure functions, independent of the model: the classifier enters as
`cam_fn(x: float32[B, 224, 224, 3]) -> float32[B, h, w, C]`, the raw class activation maps (logits
with bias: no ReLU, no max-normalisation, no background threshold) of already normalised input.

Per tile (uint8[112, 112, 3]) and scale s in `scales` (default 1, 1.25, 1.5, 1.75, 2):
  1. resize the tile to L = int(112 s) with bicubic interpolation;
  2. cut the L x L canvas into 112 sub-tiles at stride 56 (`oeem_jax.data.tiles.tile_offsets`:
     1, 4, 4, 9, 9 sub-tiles for the default scales, 27 in all);
  3. resize each sub-tile to 224 (bilinear), normalise, run `cam_fn`;
  4. upsample each CAM to 112 (bilinear, half-pixel centres = PyTorch align_corners=False);
  5. stitch into the L x L canvas, averaging where sub-tiles overlap;
  6. resize the canvas back to 112 (bilinear, no antialiasing) and sum over the scales.
Then every class absent from the tile's patch label is set to -inf and the argmax over classes gives
the tile's pseudo-mask (class 0, non-gland, wins ties and is the answer for an all-zero label). The
tile masks are merged into whole images by `oeem_jax.data.tiles.stitch_masks` (majority vote,
docs/reference.md §3.7). The alternative "soft" stitching (`label_masked_softmax`, then
`oeem_jax.data.tiles.stitch_probabilities`) averages label-masked class probabilities instead of votes.

Resizing choices. All resizes use `jax.image.resize` with `antialias=False` (half-pixel centres,
taps outside the image dropped and the rest renormalised, like PIL and PyTorch at the borders).
The reference resizes uint8 PIL images in steps 1 and 3; PIL resamples separably, horizontal pass
first, and rounds to uint8 (half up) after each pass. With `emulate_pil=True` (the default) steps 1
and 3 do the same: a W pass, round/clip to 0..255, an H pass, round/clip. Measured against PIL on a
test tile this reproduces PIL's bilinear upscale exactly and its bicubic within 2 grey levels on ~1 %
of the pixels (PIL's fixed-point weights); a single float bicubic pass instead differs by up to ~18
levels where the cubic overshoot is clipped between PIL's passes. `emulate_pil=False` keeps every
step in float32 (no rounding). jax "cubic" is the Keys kernel with a = -0.5, the same as PIL's.

Shapes are static, so one jit compile serves every batch of T tiles; `tile_pseudo_masks` pads the
last batch. All sub-tiles of a batch go through `cam_fn` in one call of batch 27 T (default scales).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from oeem_jax.config.scales import CAM_SCALES as DEFAULT_SCALES
from oeem_jax.data.tiles import STRIDE, TILE, tile_offsets
from oeem_jax.engine.parallel import padded_batches

CAM_INPUT = 224

CamFn = Callable[[jax.Array], jax.Array]


def canvas_size(scale: float, tile: int = TILE) -> int:
  """Side of the rescaled tile canvas: int(tile * scale) as the reference computes it (112 * 1.75 -> 196)."""
  return int(tile * scale)


def subtile_offsets(scale: float, tile: int = TILE, stride: int = STRIDE) -> list[tuple[int, int]]:
  """Top-left corners (y, x) of the 112 sub-tiles of the canvas at `scale`, row-major.

  Returns 1, 4, 4, 9, 9 corners for scales 1, 1.25, 1.5, 1.75, 2 (canvas 112, 140, 168, 196, 224).
  Raises ValueError for a scale < 1 (the canvas would be smaller than a sub-tile).
  """
  if scale < 1.0:
    raise ValueError(f"CAM scales must be >= 1 (canvas >= {tile} px), got {scale}")
  offs = tile_offsets(canvas_size(scale, tile), tile, stride)
  return [(int(y), int(x)) for y in offs for x in offs]


def _resize(x: jax.Array, height: int, width: int, method: str) -> jax.Array:
  n, _, _, c = x.shape
  return jax.image.resize(x, (n, height, width, c), method=method, antialias=False)


# Values this close below a half level count as the tie: exact ties are common (e.g. symmetric cubic
# taps on integer pixels) and float32 error must not decide them; PIL's fixed point rounds them up.
_TIE_TOLERANCE = 1e-3


def _to_uint8_levels(x: jax.Array) -> jax.Array:
  """PIL's uint8 store: round half up (ties within 1e-3), clip to 0..255 (kept as float32)."""
  return jnp.clip(jnp.floor(x + (0.5 + _TIE_TOLERANCE)), 0.0, 255.0)


def resize_image(x: jax.Array, size: int, method: str, *, emulate_pil: bool = True) -> jax.Array:
  """Resizes 0..255 RGB images to size x size like PIL on uint8 (or in plain float32).

  Args:
    x: float32[B, H, W, 3] with values in 0..255.
    size: output side in pixels.
    method: "cubic" (PIL BICUBIC) or "linear" (PIL BILINEAR).
    emulate_pil: separable W-then-H passes with uint8 rounding after each (see module docstring);
      False: one float32 resize, no rounding.
  Returns:
    float32[B, size, size, 3].
  """
  if not emulate_pil:
    return _resize(x, size, size, method)
  x = _to_uint8_levels(_resize(x, x.shape[1], size, method))
  return _to_uint8_levels(_resize(x, size, size, method))


def multiscale_cam(tiles: jax.Array, cam_fn: CamFn, *, scales: Sequence[float] = DEFAULT_SCALES,
                   normalize: Callable[[jax.Array], jax.Array] | None = None,
                   emulate_pil: bool = True, cam_input: int = CAM_INPUT) -> jax.Array:
  """Multi-scale CAM of 112 tiles summed over scales (docs/reference.md §3 steps 1-5).

  Args:
    tiles: uint8 (or float in 0..255) RGB [T, 112, 112, 3].
    cam_fn: float32[B, cam_input, cam_input, 3] normalised input -> float32[B, h, w, C] raw CAM
      logits (h = w = 28 for the 224 input of the paper); called once with B = T * (number of
      sub-tiles over all scales), 27 T for the default scales.
    scales: canvas scales, each >= 1.
    normalize: maps 0..255 RGB float32 [..., 3] to the classifier's input; default
      `oeem_jax.models.network.normalize_cls` (GlaS statistics, docs/reference.md §1).
    emulate_pil: PIL-like uint8 rounding in the image resizes (module docstring).
    cam_input: side the sub-tiles are resized to before `cam_fn` (224 in the reference; smaller
      values make CPU-sized runs cheaper).
  Returns:
    float32[T, 112, 112, C]: sum over scales of the stitched, resized CAMs.
  Raises:
    ValueError: tiles not [T, 112, 112, 3], a scale < 1, or cam_fn output not [B, h, w, C].
  """
  if normalize is None:
    from oeem_jax.models.network import normalize_cls as normalize
  if tiles.ndim != 4 or tuple(tiles.shape[1:]) != (TILE, TILE, 3):
    raise ValueError(f"tiles must be [T, {TILE}, {TILE}, 3] RGB, got shape {tuple(tiles.shape)}")
  if not scales:
    raise ValueError("scales must name at least one scale")
  if cam_input < 1:
    raise ValueError(f"cam_input must be a positive size, got {cam_input}")
  t = tiles.shape[0]
  x = jnp.asarray(tiles).astype(jnp.float32)
  plans = [(canvas_size(s), subtile_offsets(s)) for s in scales]

  # Steps 1-3: every sub-tile of every scale, resized to 224, in one batch [(sum k_s) * T, ...].
  crops = []
  for size, offsets in plans:
    canvas = x if size == TILE else resize_image(x, size, "cubic", emulate_pil=emulate_pil)
    crops.extend(canvas[:, y:y + TILE, xo:xo + TILE] for y, xo in offsets)
  batch = jnp.concatenate(crops, axis=0)
  batch = resize_image(batch, cam_input, "linear", emulate_pil=emulate_pil)
  cams = jnp.asarray(cam_fn(jnp.asarray(normalize(batch), jnp.float32)))
  if cams.ndim != 4 or cams.shape[0] != batch.shape[0]:
    raise ValueError(f"cam_fn must return [B={batch.shape[0]}, h, w, C], got shape {tuple(cams.shape)}")
  cams = _resize(cams.astype(jnp.float32), TILE, TILE, "linear")       # step 4
  num_classes = cams.shape[-1]

  # Steps 5-6: stitch per scale (static offsets), back to 112, sum.
  total = jnp.zeros((t, TILE, TILE, num_classes), jnp.float32)
  start = 0
  for size, offsets in plans:
    canvas = jnp.zeros((t, size, size, num_classes), jnp.float32)
    count = np.zeros((size, size, 1), np.float32)
    for i, (y, xo) in enumerate(offsets):
      sub = cams[(start + i) * t:(start + i + 1) * t]
      canvas = canvas.at[:, y:y + TILE, xo:xo + TILE].add(sub)
      count[y:y + TILE, xo:xo + TILE] += 1.0
    start += len(offsets)
    canvas = canvas / jnp.asarray(count)
    total = total + (canvas if size == TILE else _resize(canvas, TILE, TILE, "linear"))
  return total


def label_masked_argmax(cam: jax.Array, labels: jax.Array) -> jax.Array:
  """Pseudo-mask from summed CAMs and patch labels (docs/reference.md §3 step 6, paper Eq. 2).

  Args:
    cam: float[T, H, W, C] scores.
    labels: int/bool[T, C] multi-hot patch labels ([non-gland, gland] for GlaS); a class with label 0
      is excluded (score -inf).
  Returns:
    uint8[T, H, W] argmax class; ties and tiles with no present class give class 0.
  """
  if labels.ndim != 2 or labels.shape[0] != cam.shape[0] or labels.shape[1] != cam.shape[-1]:
    raise ValueError(f"labels must be [T={cam.shape[0]}, C={cam.shape[-1]}], got shape {tuple(labels.shape)}")
  present = (jnp.asarray(labels) > 0)[:, None, None, :]
  masked = jnp.where(present, cam.astype(jnp.float32), -jnp.inf)
  return jnp.argmax(masked, axis=-1).astype(jnp.uint8)


def label_masked_softmax(cam: jax.Array, labels: jax.Array | None, temperature: float) -> jax.Array:
  """Per-pixel class probabilities of a tile's CAM over the classes of its patch label.

  softmax(cam / temperature) over the classes present in `labels` (absent ones get probability 0):
  the soft counterpart of `label_masked_argmax`, whose argmax it shares, for `stitch="soft"`
  stitching (`oeem_jax.data.tiles.stitch_probabilities`). A tile whose label has one class gets
  probability 1 for it everywhere; a tile with no present class gets class 0 (non-gland), as in
  `label_masked_argmax`.

  Args:
    cam: float[T, H, W, C] scores (CAM logits summed over scales).
    labels: int/bool[T, C] multi-hot patch labels, or None for no suppression (the "CAM" column).
    temperature: > 0, in CAM logit units: small values approach one-hot (the majority vote), large
      ones make two-class tiles nearly neutral beside one-class tiles.
  Returns:
    float32[T, H, W, C] probabilities (each pixel sums to 1).
  Raises:
    ValueError: temperature <= 0 or labels not [T, C].
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  cam = cam.astype(jnp.float32) / temperature
  if labels is None:
    return jax.nn.softmax(cam, axis=-1)
  if labels.ndim != 2 or labels.shape[0] != cam.shape[0] or labels.shape[1] != cam.shape[-1]:
    raise ValueError(f"labels must be [T={cam.shape[0]}, C={cam.shape[-1]}], got shape {tuple(labels.shape)}")
  present = jnp.asarray(labels) > 0
  none = ~present.any(axis=-1, keepdims=True)
  present = present | (none & (jnp.arange(cam.shape[-1]) == 0))  # no class present -> class 0
  return jax.nn.softmax(cam, axis=-1, where=present[:, None, None, :])


def pseudo_masks(tiles: jax.Array, labels: jax.Array, cam_fn: CamFn, *,
                 scales: Sequence[float] = DEFAULT_SCALES,
                 normalize: Callable[[jax.Array], jax.Array] | None = None,
                 emulate_pil: bool = True, cam_input: int = CAM_INPUT) -> jax.Array:
  """Tile pseudo-masks: `label_masked_argmax(multiscale_cam(tiles, ...), labels)`.

  Args:
    tiles: uint8[T, 112, 112, 3] RGB tiles. labels: uint8[T, C] patch labels. Other arguments as in
    `multiscale_cam`. Traceable: wrap in jax.jit with the model parameters as arguments, e.g.
    `jax.jit(lambda p, t, l: pseudo_masks(t, l, lambda x: model.apply(p, x, method=...)))`.
  Returns:
    uint8[T, 112, 112] class ids.
  """
  cam = multiscale_cam(tiles, cam_fn, scales=scales, normalize=normalize, emulate_pil=emulate_pil,
                       cam_input=cam_input)
  return label_masked_argmax(cam, labels)


@functools.lru_cache(maxsize=16)
def _jitted(cam_fn: Callable, with_params: bool, scales: tuple[float, ...], normalize: Callable | None,
            emulate_pil: bool, cam_input: int, temperature: float | None):
  def run(params, tiles, labels):
    fn = functools.partial(cam_fn, params) if with_params else cam_fn
    cam = multiscale_cam(tiles, fn, scales=scales, normalize=normalize, emulate_pil=emulate_pil,
                         cam_input=cam_input)
    if temperature is not None:
      return (label_masked_softmax(cam, labels, temperature),
              label_masked_softmax(cam, None, temperature))
    unmasked = jnp.argmax(cam, axis=-1).astype(jnp.uint8)
    return label_masked_argmax(cam, labels), unmasked
  return jax.jit(run)


def tile_pseudo_masks(tiles: np.ndarray, labels: np.ndarray, cam_fn: Callable, *, cam_params: Any = None,
                      batch_size: int = 8, scales: Sequence[float] = DEFAULT_SCALES,
                      normalize: Callable[[jax.Array], jax.Array] | None = None,
                      emulate_pil: bool = True, cam_input: int = CAM_INPUT,
                      return_unmasked: bool = False,
                      temperature: float | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Pseudo-masks for any number of tiles, in fixed-size jitted batches (the last one padded).

  Args:
    tiles: uint8[N, 112, 112, 3]; labels: uint8[N, C] patch labels.
    cam_fn: `cam_fn(x)` or, when `cam_params` is given, `cam_fn(cam_params, x)`; passing the model
      parameters as `cam_params` makes them jit arguments instead of baked-in constants. Must be
      hashable (a function or functools.partial), since the compiled step is cached per cam_fn.
    batch_size: tiles per call (T); every call has this shape, so it compiles once.
    scales, normalize, emulate_pil, cam_input: as in `multiscale_cam`.
    return_unmasked: also return the argmax of the same CAMs without label suppression (the "CAM"
      column of paper Table 2).
    temperature: None (hard masks, for `stitch_masks`) or > 0: return soft outputs instead,
      `label_masked_softmax(cam, labels, temperature)` (unmasked: labels None), for
      `oeem_jax.data.tiles.stitch_probabilities`.
  Returns:
    uint8[N, 112, 112] pseudo-masks (NumPy), or (pseudo-masks, unmasked argmax) with return_unmasked;
    with a temperature float32[N, 112, 112, C] probabilities in their place.
  Raises:
    ValueError: mismatched or malformed shapes, batch_size < 1, temperature <= 0.
  """
  tiles = np.asarray(tiles)
  labels = np.asarray(labels)
  if tiles.ndim != 4 or tiles.shape[1:] != (TILE, TILE, 3):
    raise ValueError(f"tiles must be [N, {TILE}, {TILE}, 3], got shape {tiles.shape}")
  if labels.ndim != 2 or labels.shape[0] != tiles.shape[0]:
    raise ValueError(f"labels must be [N={tiles.shape[0]}, C], got shape {labels.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if temperature is not None and not temperature > 0:
    raise ValueError(f"temperature must be > 0 or None, got {temperature!r}")
  step = _jitted(cam_fn, cam_params is not None, tuple(float(s) for s in scales), normalize, bool(emulate_pil),
                 int(cam_input), None if temperature is None else float(temperature))
  pending = []  # dispatched asynchronously; fetched at the end
  for k, (tb, lb) in padded_batches((tiles, labels), batch_size):
    pending.append((k, step(cam_params, tb, lb)))
  if pending:
    masked = np.concatenate([np.asarray(m)[:k] for k, (m, _) in pending])
    unmasked = np.concatenate([np.asarray(u)[:k] for k, (_, u) in pending])
  elif temperature is None:
    masked = unmasked = np.zeros((0, TILE, TILE), np.uint8)
  else:
    masked = unmasked = np.zeros((0, TILE, TILE, labels.shape[1]), np.float32)
  return (masked, unmasked) if return_unmasked else masked
