"""Stage `cls`: train the patch classifier (paper §2.1 and §2.3, docs/reference.md §2).

    python -m oeem_jax.main --config=configs/cls.py[:cpu] --config.data.dir=../shared/data/glas --workdir=W

Data: the 112×112 tiles (stride 56) of the training images (the validation images carved out of
GlaS train are held back) with their multi-hot patch labels [non-gland, gland] from the true masks
(`oeem_jax.data.tiles`), streamed by `oeem_jax.data.pipeline.cls_dataset` (random resized crop to
`cls.input_size`, flips, GlaS normalisation). Loss: BCE with logits (`oeem_jax.method.losses.bce_with_logits`).

Model: `CAMClassifier` (`model.backbone`: ResNet-38d with B7 dilation 2, or EfficientNet-Lite0 at
output stride 8). From scratch, BatchNorm trains (batch statistics, synchronised over the global
batch). With `model.init_checkpoint` (the reference's ImageNet `res38d.pth`, or "efficientnet_lite0")
the backbone is loaded non-strictly and, as in the reference (`model.bn` "auto"), every BN runs on
its running statistics with gamma/beta frozen and the stem (`conv1a` / `conv_stem`) is frozen
(optimizer mask); `model.bn = "train"` trains BN instead.

Validation every `train.eval_every` steps and at the end, on the validation images only (never
test): tile-label F1 (sigmoid > 0.5 against the true patch labels) and CAM mIoU (single-scale CAM of
each tile at `cls.input_size`, upsampled to 112, argmax restricted to the tile's true patch label,
tiles stitched as `cls.stitch` says: majority vote (`tiles.stitch_masks`) or, "soft", the mean of
label-masked softmax(CAM / `cls.stitch_temperature`) (`tiles.stitch_probabilities`), as the cam
stage's `cam.stitch` does; one confusion matrix over all validation
images). The best checkpoint by `cam_miou` is kept in WORKDIR/cls/best/; periodic ones in
WORKDIR/cls/checkpoints/. TensorBoard (WORKDIR/cls/tensorboard) gets training scalars, the
validation metrics and, per evaluation, panels [image | true mask | CAM gland score | CAM mask] of a
few validation images.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from oeem_jax.data import tiles as tiles_lib
from oeem_jax.engine import train
from oeem_jax.engine.checkpoint import run_identity
from oeem_jax.engine.parallel import BatchedApply
from oeem_jax.evaluation import metrics
from oeem_jax.method import losses
from oeem_jax.method.pseudo_mask import label_masked_argmax, label_masked_softmax
from oeem_jax.models.network import config_input_stats as input_stats
from oeem_jax.models.network import imagenet_init_hook
from oeem_jax.stages._training import (StageParts, average_note, colour_mask, panel, summary_line,
                                       train_stage)

if TYPE_CHECKING:  # annotations only: importing this module needs no ml_collections
  import ml_collections


def uses_pretrained(config: ml_collections.ConfigDict) -> bool:
  """True when `model.init_checkpoint` names ImageNet weights (BN and stem are then frozen)."""
  return bool(config.model.get("init_checkpoint", ""))


def build_tiles(examples: Sequence[Any], data_cfg) -> tuple[np.ndarray, np.ndarray]:
  """Tiles and patch labels of `examples` (docs/reference.md §1).

  Args:
    examples: `oeem_jax.data.source.Example`s (image uint8[H, W, 3], mask uint8[H, W] instance ids).
    data_cfg: `config.data` (tile_size, tile_stride, label_threshold).

  Returns:
    (tiles uint8[T, t, t, 3], labels uint8[T, 2]) concatenated over the examples in order.

  Raises:
    ValueError: no examples.
  """
  if not examples:
    raise ValueError("cls: no training images (config key data.dir / data.val_count)")
  size, stride = int(data_cfg.tile_size), int(data_cfg.tile_stride)
  tiles, labels = [], []
  for ex in examples:
    t, lab = tiles_lib.example_tiles(ex, size, stride, float(data_cfg.label_threshold))
    tiles.append(t)
    labels.append(lab)
  return np.concatenate(tiles), np.concatenate(labels)


def _heat(score: np.ndarray) -> np.ndarray:
  """float[H, W] in [0, 1] -> uint8[H, W, 3] (blue = 0 ... red = 1)."""
  s = np.clip(score, 0.0, 1.0)
  return (np.stack([s, 0.2 * np.ones_like(s), 1.0 - s], axis=-1) * 255).astype(np.uint8)


class Validator:
  """Tile-label F1 and single-scale CAM mIoU on the validation images (module docstring).

  Args:
    model: the classifier (its `cam` method is used, eval mode).
    examples: validation `Example`s.
    data_cfg: `config.data` (tile grid, label threshold).
    input_size: network input side (tiles are resized from 112 bilinearly, then normalised).
    batch_size: tiles per jitted call (rounded up to a multiple of the device count).
    mesh: device mesh; tiles are sharded over its "data" axis.
    num_images: validation images rendered for TensorBoard.
    stats: input normalisation (mean, std) on 0..255 RGB; None = `normalize_cls`'s GlaS statistics.
    stitch: "vote" or "soft" (`tiles.stitch`); stitch_temperature: the soft mode's temperature.
  """

  def __init__(self, model, examples, data_cfg, *, input_size: int, batch_size: int, mesh,
               num_images: int = 3, stats=None, stitch: str = "vote",
               stitch_temperature: float = 48.0):
    from oeem_jax.models.network import normalize_cls
    self.examples = list(examples)
    self.size, self.stride = int(data_cfg.tile_size), int(data_cfg.tile_stride)
    self.tiles, self.labels, self.counts = [], [], []
    for ex in self.examples:
      t, lab = tiles_lib.example_tiles(ex, self.size, self.stride, float(data_cfg.label_threshold))
      self.tiles.append(t)
      self.labels.append(lab)
      self.counts.append(len(t))
    self.num_images = num_images
    self.stitch = stitch
    temperature = float(stitch_temperature) if stitch == "soft" else None
    size = self.size

    def cam_fn(variables, tiles, labels):
      x = normalize_cls(tiles.astype(jnp.float32), stats)
      n = x.shape[0]
      if input_size != size:
        x = jax.image.resize(x, (n, input_size, input_size, 3), "bilinear", antialias=False)
      cam = model.apply(variables, x, method=model.cam).astype(jnp.float32)
      logits = cam.mean(axis=(1, 2))  # the linear head commutes with global average pooling
      cam = jax.image.resize(cam, (n, size, size, cam.shape[-1]), "bilinear", antialias=False)
      if temperature is None:
        masks = label_masked_argmax(cam, labels)
      else:
        masks = label_masked_softmax(cam, labels, temperature)
      gland_score = jax.nn.sigmoid(cam[..., 1] - cam[..., 0])
      return logits, masks, gland_score

    self._apply = BatchedApply(cam_fn, mesh, batch_size)

  def __call__(self, variables, step: int) -> train.EvalResult:
    conf = np.zeros((2, 2), np.int64)
    tp = fp = fn = 0
    tp_g = fp_g = fn_g = 0
    images = {}
    for idx, ex in enumerate(self.examples):
      logits, masks, score = self._apply.map(variables, self.tiles[idx], self.labels[idx])
      pred = (logits > 0).astype(np.uint8)  # sigmoid(logit) > 0.5
      true = self.labels[idx]
      tp += int(np.sum(pred & true))
      fp += int(np.sum(pred & (1 - true)))
      fn += int(np.sum((1 - pred) & true))
      tp_g += int(np.sum(pred[:, 1] & true[:, 1]))
      fp_g += int(np.sum(pred[:, 1] & (1 - true[:, 1])))
      fn_g += int(np.sum((1 - pred[:, 1]) & true[:, 1]))
      h, w = ex.image.shape[:2]
      boxes = tiles_lib.tile_boxes(h, w, self.size, self.stride)
      mask = tiles_lib.stitch(masks, boxes, h, w, self.stitch)
      conf += metrics.confusion_matrix(mask, (ex.mask > 0).astype(np.uint8))
      if idx < self.num_images:
        heat = tiles_lib.stitch_scores(score[..., None], boxes, h, w)[..., 0]
        images[f"val_{idx}_{ex.name}"] = panel(ex.image, colour_mask(ex.mask), _heat(heat),
                                               colour_mask(mask))
    pix = metrics.pixel_metrics(conf)

    def f1(tp, fp, fn):
      return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")

    return train.EvalResult(
        metrics={"cam_miou": pix["miou"], "cam_iou_gland": pix["iou"][1],
                 "cam_iou_background": pix["iou"][0], "tile_f1": f1(tp, fp, fn),
                 "tile_f1_gland": f1(tp_g, fp_g, fn_g)},
        images=images)


def make_loss_fn(model):
  """(params, batch_stats, batch, rng) -> (loss, (batch_stats, metrics)) for `train.train_loop`.

  batch: {"image": float32[B, S, S, 3] normalised tiles, "label": float32[B, 2] multi-hot}. Loss:
  `losses.bce_with_logits` (mean over B x 2, docs/reference.md §2). With a BN-frozen model the running
  statistics come back unchanged.
  """
  def loss_fn(params, batch_stats, batch, rng):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                  train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    loss = losses.bce_with_logits(logits, batch["label"])
    acc = jnp.mean(((logits > 0) == (batch["label"] > 0.5)).astype(jnp.float32))
    return loss, (updates.get("batch_stats", batch_stats), {"label_acc": acc})

  return loss_fn


def run(config: ml_collections.ConfigDict, stage_dir: Path) -> dict[str, Any]:
  """Trains the classifier (module docstring); returns the summary fields of `train.train_loop`
  plus data counts and the final summary line.

  Raises:
    ValueError: bad config values (e.g. batch not divisible by the devices).
    FileNotFoundError: `model.init_checkpoint` does not exist.
    errors.NonFiniteLossError, train.Preempted: see `train.train_loop`.
  """
  from oeem_jax.data import loader, pipeline

  data = loader.load_splits(config.data)
  tiles, labels = build_tiles(data.splits["train"], config.data)
  batch = int(config.train.batch_size)
  steps = int(config.train.steps) or int(config.cls.epochs) * (len(tiles) // batch)
  if steps <= 0:
    from oeem_jax.errors import ConfigError
    raise ConfigError("train.steps", f"{config.train.steps} (cls.epochs {config.cls.epochs} * "
                      f"floor({len(tiles)} tiles / batch {batch}) = {steps} steps)",
                      "a number of steps >= 1, or a train.batch_size below the tile count")
  logging.info("cls: %d training tiles from %d images (gland in %.0f %%, non-gland in %.0f %%), "
               "%d validation images; %d steps of batch %d (%.2f epochs)", len(tiles),
               len(data.splits["train"]), 100 * labels[:, 1].mean(), 100 * labels[:, 0].mean(),
               len(data.splits["val"]), steps, batch, steps * batch / len(tiles))

  pretrained = uses_pretrained(config)
  from oeem_jax.models import make_classifier
  model = make_classifier(config)
  input_size = int(config.cls.input_size)
  load = imagenet_init_hook(config, "cls")  # pretrained-weights hook for train_loop (or None)
  stats = input_stats(config)

  def dataset(start_step):
    return pipeline.cls_dataset(tiles, labels, input_size=input_size, global_batch_size=batch,
                                seed=int(config.seed), start_step=start_step, stats=stats,
                                process_index=jax.process_index(), process_count=jax.process_count())

  def make_validator(mesh):
    return Validator(model, data.splits["val"], config.data, input_size=input_size,
                     batch_size=int(config.cls.eval_batch_size), mesh=mesh,
                     num_images=int(config.cls.num_eval_images), stats=stats,
                     stitch=str(config.cls.stitch), stitch_temperature=float(config.cls.stitch_temperature))

  # Frozen BN: gamma/beta frozen too, and with ImageNet weights the stem (the reference).
  freeze = dict(freeze_stem=pretrained, freeze_bn=True) if model.bn_frozen else None
  result = train_stage(config, stage_dir, StageParts(
      name="cls", model=model, input_size=input_size, loss_fn=make_loss_fn(model), dataset=dataset,
      pretrained=load, freeze=freeze, val_examples=data.splits["val"], make_validator=make_validator,
      best_metric="cam_miou", identity=run_identity(config, ("cls", "model", "data"))), steps)
  fe = result["final_eval"]
  line = summary_line("cls", result, "CAM mIoU", "cam_miou")
  if fe:
    line += f", tile F1 {100 * fe['tile_f1']:.2f}"
  line += average_note(result, "CAM mIoU", "cam_miou")
  result.update({
      "num_train_tiles": int(len(tiles)),
      "num_train_images": len(data.splits["train"]),
      "val_names": data.val_names,
      "synthetic_data": data.synthetic,
      "pretrained": pretrained,
      "pretrained_report": load.report if load is not None else {},
      "bn_frozen": bool(model.bn_frozen),
      "final_line": line,
  })
  return result
