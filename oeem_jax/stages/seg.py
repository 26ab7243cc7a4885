"""Stage `seg`: train the PSPNet segmenter on pseudo-masks (OEEM) or true masks (paper §2.2-2.3,
docs/reference.md §4-5).

    python -m oeem_jax.main --config=configs/seg_oeem.py[:cpu] --config.data.dir=../shared/data/glas --workdir=W
    (configs/seg_ce.py: plain cross-entropy baseline; configs/seg_full.py: true masks, fully supervised)

Data: the training images (validation images carved out of GlaS train are held back) with masks from
`seg.mask_source`:
  * "pseudo": palette/grey PNGs `<name>.png` (values 0/1, 255 = ignore) in `seg.pseudo_dir`, default
    WORKDIR/cam/pseudo_masks (written by stage `cam`);
  * "true": the GlaS annotations (instance ids > 0 -> gland 1): the fully supervised upper bound.
Crops come from `oeem_jax.data.pipeline.seg_dataset` (random rescale in [scale_min, scale_max], random
crop `seg.crop_size`, horizontal flip, photometric distortion, ImageNet normalisation, padding
labelled 255).

Loss: `losses.segmentation_loss(logits, mask, kind=seg.loss_kind)` on the decode head plus
`seg.aux_weight` (0.4) times the same loss on the auxiliary head, both at crop resolution.
BN trains with batch statistics over the global batch. `model.init_checkpoint` loads the ImageNet
ResNet-38d backbone (non-strict, nothing frozen), as the reference does; `seg.backbone_init` loads
the backbone of our stage-`cls` classifier instead (the `:cpu` default, `init_hook`).

Validation every `train.eval_every` steps and at the end: single-scale whole-image sliding-window
prediction (`inference.sliding_window_logits`, window/stride `seg.eval_window`/`seg.eval_stride`) of
the validation images, one confusion matrix -> `miou` (+ gland IoU, Dice). The best checkpoint by
`miou` is kept in WORKDIR/seg/best/ (what stage `eval` restores by default); TensorBoard gets panels
[image | true mask | prediction] of a few validation images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from oeem_jax.engine import train
from oeem_jax.engine.checkpoint import load_variables, run_identity
from oeem_jax.engine.parallel import BatchedApply
from oeem_jax.evaluation import inference, metrics
from oeem_jax.method import losses
from oeem_jax.models.network import config_input_stats as input_stats
from oeem_jax.models.network import imagenet_init_hook
from oeem_jax.runtime import artifacts, io_utils
from oeem_jax.stages._training import (StageParts, average_note, colour_mask, panel, summary_line,
                                       train_stage)

if TYPE_CHECKING:  # annotations only: importing this module needs no ml_collections
  import ml_collections



def pseudo_dir(config: ml_collections.ConfigDict, stage_dir: Path) -> Path:
  """Folder of the pseudo-masks: `seg.pseudo_dir`, default WORKDIR/cam/pseudo_masks."""
  if config.seg.pseudo_dir:
    return Path(config.seg.pseudo_dir).expanduser()
  return artifacts.pseudo_mask_dir(artifacts.upstream_dir(stage_dir, "cam"))


def training_masks(config: ml_collections.ConfigDict, stage_dir: Path, examples: Sequence[Any]
                   ) -> list[np.ndarray]:
  """uint8[H, W] class masks (0/1, 255 ignore) of `examples` from `seg.mask_source`.

  `seg.mask_source` ("pseudo" or "true") was checked by `config.check.validate`.

  Raises:
    see `artifacts.read_pseudo_mask`.
  """
  if config.seg.mask_source == "true":
    return [(ex.mask > 0).astype(np.uint8) for ex in examples]
  folder = pseudo_dir(config, stage_dir)
  return [artifacts.read_pseudo_mask(artifacts.mask_file(folder, ex.name), ex.image.shape[:2])
          for ex in examples]


def _masks_digest(masks: Sequence[np.ndarray]) -> str:
  import hashlib
  h = hashlib.sha256()
  for m in masks:
    h.update(str(m.shape).encode())
    h.update(np.ascontiguousarray(m).tobytes())
  return h.hexdigest()


class Validator:
  """Single-scale whole-image mIoU on the validation images (module docstring).

  Args:
    model: the segmenter.
    examples: validation `Example`s (uint8 images, instance-id masks).
    window, stride: sliding window (pixels).
    batch_size: windows per jitted call (rounded up to a multiple of the device count).
    mesh: device mesh (windows sharded over "data").
    num_images: validation images rendered for TensorBoard.
    stats: input normalisation (mean, std) on 0..255 RGB; None = ImageNet statistics (`normalize_seg`).
  """

  def __init__(self, model, examples, *, window: int, stride: int, batch_size: int, mesh,
               num_images: int = 3, stats=None):
    from oeem_jax.models.network import normalize_seg
    self.examples = list(examples)
    self.inputs = [np.asarray(normalize_seg(ex.image, stats), np.float32) for ex in self.examples]
    self.window, self.stride = int(window), int(stride)
    self.num_images = num_images
    self._apply = BatchedApply(lambda v, x: model.apply(v, x, train=False)[0], mesh, batch_size)

  def __call__(self, variables, step: int) -> train.EvalResult:
    def apply_fn(x):
      return np.asarray(self._apply(variables, x))

    conf = np.zeros((2, 2), np.int64)
    images = {}
    for idx, (ex, x) in enumerate(zip(self.examples, self.inputs)):
      logits = inference.sliding_window_logits(apply_fn, x, window=self.window, stride=self.stride,
                                               batch_size=self._apply.batch)
      pred = np.argmax(logits, axis=-1).astype(np.uint8)
      conf += metrics.confusion_matrix(pred, (ex.mask > 0).astype(np.uint8))
      if idx < self.num_images:
        images[f"val_{idx}_{ex.name}"] = panel(ex.image, colour_mask(ex.mask), colour_mask(pred))
    pix = metrics.pixel_metrics(conf)
    return train.EvalResult(metrics={"miou": pix["miou"], "iou_gland": pix["iou"][1],
                                     "iou_background": pix["iou"][0], "dice": pix["dice"]},
                            images=images)


def backbone_init_dir(config: ml_collections.ConfigDict, stage_dir: Path) -> Path | None:
  """The classifier stage folder named by `seg.backbone_init` ("" = none, "cls" = WORKDIR/cls)."""
  value = str(config.seg.get("backbone_init", "") or "")
  if not value:
    return None
  return artifacts.upstream_dir(stage_dir, "cls", "" if value == "cls" else value)


def copy_backbone(variables: dict[str, Any], source: dict[str, Any], origin: str) -> dict[str, Any]:
  """The segmenter `variables` with params/batch_stats['backbone'] replaced by `source`'s.

  Args:
    variables: {"params": {"backbone", "decode", "aux"}, "batch_stats": ...} host arrays of PSPNet.
    source: {"params": {"backbone", ...}, "batch_stats": ...} of a CAMClassifier (same width).
    origin: where `source` came from, for error messages.

  Raises:
    ValueError: `source` has no backbone, or its tree or any shape differs (e.g. another
      `model.width`); the message names the first mismatching key.
  """
  out = {k: dict(v) for k, v in variables.items()}
  for coll in ("params", "batch_stats"):
    if coll not in variables or "backbone" not in variables[coll]:
      continue
    src = source.get(coll, {}).get("backbone")
    if src is None:
      raise ValueError(f"seg.backbone_init: {origin} has no {coll}['backbone']")
    dst_flat = dict(jax.tree_util.tree_flatten_with_path(variables[coll]["backbone"])[0])
    src_flat = dict(jax.tree_util.tree_flatten_with_path(src)[0])
    for key, leaf in dst_flat.items():
      name = coll + "/backbone" + jax.tree_util.keystr(key)
      if key not in src_flat:
        raise ValueError(f"seg.backbone_init: {origin} lacks {name}")
      if np.shape(src_flat[key]) != np.shape(leaf):
        raise ValueError(f"seg.backbone_init: {name} is {np.shape(src_flat[key])} in {origin} but "
                         f"{np.shape(leaf)} in the segmenter (same model.width needed)")
    out[coll]["backbone"] = jax.tree.map(lambda a, b: np.asarray(b, np.asarray(a).dtype),
                                         variables[coll]["backbone"], src)
  return out


def init_hook(config: ml_collections.ConfigDict, stage_dir: Path):
  """The `train_loop(pretrained=...)` hook of the segmenter, or None.

  * `model.init_checkpoint`: the ImageNet ResNet-38d backbone (the reference, docs/reference.md §4);
  * `seg.backbone_init`: the backbone (parameters and BN statistics) of our own stage-`cls`
    classifier, checkpoint `seg.backbone_checkpoint` ("cls" = WORKDIR/cls). It saw only patch
    labels, so the method stays weakly supervised; this is the `:cpu` default, where no ImageNet
    weights are used and a from-scratch PSPNet learns too slowly in a CPU budget (README
    "Differences").

  Raises:
    ValueError: both keys set.
    FileNotFoundError: the classifier folder has no checkpoint (the message says how to fix it).
  """
  cls_dir = backbone_init_dir(config, stage_dir)
  imagenet = imagenet_init_hook(config, "seg")
  if cls_dir is None:
    return imagenet
  if imagenet is not None:
    from oeem_jax.errors import ConfigError
    raise ConfigError("seg.backbone_init", repr(config.seg.backbone_init),
                      f"'' while model.init_checkpoint is set ({config.model.init_checkpoint!r}): "
                      "both set; choose one backbone initialisation")
  if not any((cls_dir / d).is_dir() for d in ("best", "checkpoints", "average")):
    raise FileNotFoundError(
        f"config key seg.backbone_init: no classifier checkpoint in {cls_dir} (run stage cls "
        "there, point the key at a cls stage folder, or set --config.seg.backbone_init='' to "
        "train the backbone from scratch)")

  def load_weights(variables):
    which = config.seg.get("backbone_checkpoint", "best")
    source, step = load_variables(cls_dir, which)
    logging.info("seg: backbone initialised from the %s classifier checkpoint in %s (step %d)", which,
                 cls_dir, step)
    return copy_backbone(variables, source, f"{cls_dir} (step {step})")

  return load_weights


def make_loss_fn(model, seg_cfg):
  """(params, batch_stats, batch, rng) -> (loss, (batch_stats, metrics)) for `train.train_loop`.

  batch: {"image": float32[B, c, c, 3], "mask": int32[B, c, c] (0/1, 255 ignore)}. Loss =
  L(decode) + aux_weight * L(aux), L = `losses.segmentation_loss(kind=seg.loss_kind)`.
  """
  kind = str(seg_cfg.loss_kind)
  compat = bool(seg_cfg.get("loss_reference_compat", False))
  aux_weight = float(seg_cfg.aux_weight)

  def loss_fn(params, batch_stats, batch, rng):
    (logits, aux), updates = model.apply({"params": params, "batch_stats": batch_stats},
                                         batch["image"], train=True, mutable=["batch_stats"],
                                         rngs={"dropout": rng})
    labels = batch["mask"].astype(jnp.int32)
    main = losses.segmentation_loss(logits, labels, kind=kind, reference_compat=compat)
    aux_loss = losses.segmentation_loss(aux, labels, kind=kind, reference_compat=compat)
    valid = labels != 255
    acc = jnp.sum((jnp.argmax(logits, -1) == labels) & valid) / jnp.maximum(jnp.sum(valid), 1)
    return main + aux_weight * aux_loss, (updates["batch_stats"],
                                          {"loss_decode": main, "loss_aux": aux_loss,
                                           "pixel_acc": acc})

  return loss_fn


def relabel_masks(model, variables, examples: Sequence[Any], config: ml_collections.ConfigDict,
                  normalize) -> list[np.ndarray]:
  """A self-training round's labels: the segmenter's own prediction of each training image, with the
  classes absent from a tile's patch label suppressed and the tiles stitched by majority vote.

  This is what stage cam does with the classifier's CAMs (docs/reference.md §3 steps 6-7), with the
  segmenter's class probabilities (`inference.predict_probs` at `seg.relabel_scales`, flipped too with
  `seg.relabel_flip`, window / stride `seg.eval_window` / `seg.eval_stride`) in place of the CAM: the
  patch labels (`data.tile_size` / `data.tile_stride` grid, `data.label_threshold`) are the weak
  supervision both rounds share, so no pixel label is used.

  Args:
    model, variables: the trained segmenter (PSPNet; {"params", "batch_stats"}).
    examples: the training `Example`s (uint8[H, W, 3] images; their masks give the patch labels).
    config: the seg stage config.
    normalize: float32[h, w, 3] RGB 0..255 -> network input.

  Returns:
    one uint8[H, W] mask (0 = non-gland, 1 = gland) per example.
  """
  from oeem_jax.data import tiles as tiles_lib
  from oeem_jax.method import pseudo_mask
  from oeem_jax.models import segmenter_apply_fn

  apply_fn = segmenter_apply_fn(model, variables)
  scales = tuple(float(v) for v in config.seg.relabel_scales)
  tile, tile_stride = int(config.data.tile_size), int(config.data.tile_stride)
  out = []
  for k, ex in enumerate(examples):
    probs = inference.predict_probs(apply_fn, ex.image, normalize=normalize, scales=scales,
                                    flip=bool(config.seg.relabel_flip),
                                    window=int(config.seg.eval_window),
                                    stride=int(config.seg.eval_stride),
                                    batch_size=int(config.seg.eval_batch_size))
    h, w = probs.shape[:2]
    _, labels = tiles_lib.example_tiles(ex, tile, tile_stride, float(config.data.label_threshold),
                                        images=False)
    tile_masks = pseudo_mask.label_masked_argmax(tiles_lib.extract_tiles(probs, tile, tile_stride),
                                                 labels)
    out.append(tiles_lib.stitch(np.asarray(tile_masks), tiles_lib.tile_boxes(h, w, tile, tile_stride),
                                h, w, "vote"))
    logging.log_every_n_seconds(logging.INFO, "seg: relabelled %d/%d training images", 20, k + 1,
                                len(examples))
  return out


def run(config: ml_collections.ConfigDict, stage_dir: Path) -> dict[str, Any]:
  """Trains the segmenter (module docstring); returns the summary fields of `train.train_loop`
  plus data facts and the final summary line.

  With `seg.self_training_rounds` = R > 0 the segmenter is trained R + 1 times, each round from the
  same initialisation with the previous round's relabelled training images as its masks
  (`relabel_masks`); rounds 0 .. R-1 live in WORKDIR/seg/round_<r>/ (each with its
  `relabelled/<name>.png` masks and a `round.json`), the last in WORKDIR/seg. A rerun resumes at the
  first round without its round.json.

  Raises:
    FileNotFoundError: missing pseudo-masks or `model.init_checkpoint`.
    ValueError: bad config values (mask source, loss kind, batch not divisible by the devices).
    errors.NonFiniteLossError, train.Preempted: see `train.train_loop`.
  """
  from oeem_jax.data import loader

  data = loader.load_splits(config.data)
  examples = data.splits["train"]
  if not examples:
    raise ValueError("seg: no training images (config key data.dir / data.val_count)")
  masks = training_masks(config, stage_dir, examples)
  if config.seg.mask_source == "pseudo":
    agree = [np.mean((m == 1) == (ex.mask > 0)) for m, ex in zip(masks, examples)]
    logging.info("seg: pseudo-masks from %s agree with the true masks on %.1f %% of the pixels",
                 pseudo_dir(config, stage_dir), 100 * float(np.mean(agree)))
  rounds = int(config.seg.get("self_training_rounds", 0))
  history = []
  for r in range(rounds + 1):
    where = artifacts.round_dir(stage_dir, r, rounds)
    done = where / "round.json"
    if r < rounds and done.is_file():
      with open(done) as f:
        history.append(json.load(f))
      logging.info("seg: self-training round %d of %d complete (%s), skipped", r, rounds, done)
    else:
      where.mkdir(parents=True, exist_ok=True)
      if rounds:
        logging.info("seg: self-training round %d of %d in %s", r, rounds, where)
      result = _train_round(config, stage_dir, where, data, examples, masks)
      entry = {"round": r, "dir": str(where), "final_eval": result.get("final_eval"),
               "average": result.get("average"), "params_digest": result.get("params_digest")}
      if r < rounds:
        io_utils.atomic_write_json(done, entry)
      history.append(entry)
    if r < rounds:
      masks = _relabelled(config, where, examples)
  if rounds:
    result["self_training"] = history
    result["final_line"] += "; self-training: " + ", ".join(
        f"round {h['round']} val mIoU {100 * h['final_eval']['miou']:.2f}" for h in history
        if h.get("final_eval"))
  return result


def _relabelled(config, where: Path, examples) -> list[np.ndarray]:
  """The masks of the round after the one in `where`: read back from `where/relabelled/` when a
  previous run finished them, else predicted (`relabel_masks`) and written there (marker last)."""
  from oeem_jax.engine.checkpoint import load_variables
  from oeem_jax.models.network import trained_network

  folder = where / "relabelled"
  marker = folder / "relabel.json"
  if marker.is_file():
    return [artifacts.read_pseudo_mask(artifacts.mask_file(folder, ex.name), ex.image.shape[:2])
            for ex in examples]
  variables, step = load_variables(where, "latest")
  network = trained_network(where, "seg")
  out = relabel_masks(network.model, variables, examples, config, network.normalize)
  for ex, m in zip(examples, out):
    io_utils.atomic_write_png(artifacts.mask_file(folder, ex.name), m,
                              palette=artifacts.PSEUDO_MASK_PALETTE)
  agree = float(np.mean([np.mean((m == 1) == (ex.mask > 0)) for m, ex in zip(out, examples)]))
  io_utils.atomic_write_json(marker, {"step": step, "num_images": len(out),
                                      "scales": list(config.seg.relabel_scales),
                                      "flip": bool(config.seg.relabel_flip),
                                      "agreement_with_true_masks": agree})
  logging.info("seg: %d relabelled masks in %s (agree with the true masks on %.1f %% of the pixels)",
               len(out), folder, 100 * agree)
  return out


def _train_round(config, stage_dir: Path, where: Path, data, examples, masks) -> dict[str, Any]:
  """One training of the segmenter in `where` on `masks` (the body of `run`)."""
  from oeem_jax.data import pipeline

  images = [ex.image for ex in examples]
  steps = int(config.train.steps)
  batch = int(config.train.batch_size)
  crop = int(config.seg.crop_size)
  logging.info("seg: %d training images (%s masks), %d validation images; %d steps of batch %d, "
               "crop %d, loss %s", len(examples), config.seg.mask_source, len(data.splits["val"]),
               steps, batch, crop, config.seg.loss_kind)

  from oeem_jax.models import make_segmenter
  model = make_segmenter(config)
  load = init_hook(config, stage_dir)  # pretrained-weights hook for train_loop
  stats = input_stats(config)

  def dataset(start_step):
    return pipeline.seg_dataset(images, masks, crop_size=crop,
                                scale_range=(float(config.seg.scale_min), float(config.seg.scale_max)),
                                global_batch_size=batch, seed=int(config.seed), start_step=start_step,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                photometric=bool(config.seg.photometric), stats=stats)

  def make_validator(mesh):
    return Validator(model, data.splits["val"], window=int(config.seg.eval_window),
                     stride=int(config.seg.eval_stride), batch_size=int(config.seg.eval_batch_size),
                     mesh=mesh, num_images=int(config.seg.num_eval_images), stats=stats)

  identity = run_identity(config, ("seg", "model", "data"))
  identity["seg"]["pseudo_dir"] = None  # where the masks live does not matter, their content does:
  identity["masks_sha256"] = _masks_digest(masks)
  freeze = (dict(freeze_stem=False, freeze_bn=True, only_under="backbone")
            if model.backbone_bn_frozen else None)
  result = train_stage(config, where, StageParts(
      name="seg", model=model, input_size=crop, loss_fn=make_loss_fn(model, config.seg),
      dataset=dataset, pretrained=load, freeze=freeze, val_examples=data.splits["val"],
      make_validator=make_validator, best_metric="miou", identity=identity), steps)
  line = summary_line(f"seg ({config.seg.mask_source} masks, {config.seg.loss_kind})", result,
                      "mIoU", "miou") + average_note(result, "mIoU", "miou")
  result.update({
      "num_train_images": len(examples),
      "mask_source": config.seg.mask_source,
      "loss_kind": config.seg.loss_kind,
      "pretrained_report": getattr(load, "report", {}),
      "backbone_bn_frozen": bool(model.backbone_bn_frozen),
      "val_names": data.val_names,
      "synthetic_data": data.synthetic,
      "final_line": line,
  })
  return result
