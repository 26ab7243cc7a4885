"""Checks of config values before a stage starts (the error they raise: `oeem_jax.errors.ConfigError`).

`ConfigError` is what `python -m oeem_jax.main` turns into one line and exit status 2:

    error: config key seg.loss_kind: 'foo'; expected one of ce, oeem, c_max, c_diff, lc_mix, ohem

`validate(config)` runs the checks of `config.stage` (for a pipeline: of every stage in
`pipeline.stages`, keys reported with their `stage_<name>.` prefix) on the sections present; it is
called by `stages.run_stage` before anything is written. Stages still raise `ConfigError` for what
only they can know (e.g. a checkpoint of another run in the workdir, `train.steps` derived as 0).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable, Sequence

from oeem_jax.errors import ConfigError

SPLITS = ("train", "val", "test_a", "test_b", "test")
# == oeem_jax.models.classifier.BACKBONES (tests/test_efficientnet.py), spelled out so that checking
# a config imports no jax.
BACKBONES = ("resnet38", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# The ImageNet weights `model.init_checkpoint` can name (each fits only the backbone of its name).
NAMED_WEIGHTS = tuple(b for b in BACKBONES if b.startswith("efficientnet_lite"))
DTYPES = ("float32", "bfloat16")
DISTRIBUTED = ("auto", "on", "off")
BN_MODES = ("auto", "frozen", "train")
# == oeem_jax.data.tiles.STITCH_MODES (tests/test_data_tiles.py): how overlapping tiles merge.
STITCH_MODES = ("vote", "soft")
# == oeem_jax.method.losses.KINDS (tests/test_losses.py): the segmenter's losses (`seg.loss_kind`).
LOSS_KINDS = ("ce", "oeem", "c_max", "c_diff", "lc_mix", "ohem")
CHECKPOINT_CHOICES = "'best', 'average', 'latest' or a step number >= 0"


def quote(value: Any) -> str:
  """How a given value is shown in a message: repr for strings, plain for numbers and tuples."""
  if isinstance(value, (list, tuple)):
    return "(" + ", ".join(quote(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return repr(value)


def _get(config, path: str, default: Any = KeyError) -> Any:
  node = config
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      if default is KeyError:
        raise KeyError(path) from None
      return default
  return node


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _names(text: Any) -> list[str]:
  return [s.strip() for s in str(text).split(",") if s.strip()]


# A rule: (key, accept(value, config) -> bool, expected text or a function returning it). Rules of
# absent keys are skipped.
Rule = tuple[str, Callable[[Any, Any], bool], "str | Callable[[], str]"]


def _int_at_least(lo: int) -> Callable[[Any, Any], bool]:
  return lambda v, c: _is_int(v) and v >= lo


def _positive(v, c) -> bool:
  return _is_number(v) and v > 0


def _non_negative(v, c) -> bool:
  return _is_number(v) and v >= 0


def _one_of(choices: Sequence[str]) -> Callable[[Any, Any], bool]:
  return lambda v, c: v in choices


def _scales(v, c) -> bool:
  return (isinstance(v, (list, tuple)) and len(v) > 0
          and all(_is_number(s) and s > 0 for s in v))


def _splits(v, c) -> bool:
  names = _names(v)
  return bool(names) and all(n in SPLITS for n in names)


def _checkpoint(v, c) -> bool:
  if v in ("best", "average", "latest"):
    return True
  try:
    return int(str(v)) >= 0
  except ValueError:
    return False


def averaged_steps(every: int, total: int, from_step: int) -> list[int]:
  """The periodic checkpoint steps (every `every` steps and the last, `total`) that are >= `from_step`:
  what `checkpoint.average_from` averages."""
  steps = set(range(every, total + 1, every)) if every > 0 else set()
  return sorted(s for s in steps | {total} if s >= from_step)


def _average_from(v, c) -> bool:
  if not _is_int(v) or v < 0:
    return False
  total, every = _get(c, "train.steps", 0), _get(c, "checkpoint.every", 0)
  if v == 0 or not _is_int(total) or total <= 0:  # steps from cls.epochs: checked by the stage
    return True
  n = len(averaged_steps(int(every), int(total), int(v)))
  return v <= total and n <= _get(c, "checkpoint.keep", 1)


def _average_from_expected() -> str:
  return ("0 (off) or a step in 1..train.steps from which on checkpoint.keep holds every periodic "
          "checkpoint (every checkpoint.every steps, and the last)")


def _stride(window_key: str) -> Callable[[Any, Any], bool]:
  def accept(v, c) -> bool:
    window = _get(c, window_key, None)  # None: unset (predict: the model's), checked later
    return _is_int(v) and v > 0 and (window is None or v <= window)
  return accept


def _sliding_window_rules(section: str) -> list[Rule]:
  """The rules of the multi-scale sliding-window inference keys that eval.* and predict.* share:
  scales, window, stride, batch_size and the post-processing of `section` (areas, split_h)."""
  return [
      (f"{section}.scales", _scales, "a non-empty tuple of scales > 0, e.g. (0.75, 1.0, 1.25)"),
      (f"{section}.window", _int_at_least(8), "a window side in pixels >= 8"),
      (f"{section}.stride", _stride(f"{section}.window"), f"a stride in pixels in 1..{section}.window"),
      (f"{section}.batch_size", _int_at_least(1), "a batch size >= 1"),
      (f"{section}.min_object_area", _int_at_least(0), "an area in pixels >= 0 (0 = off)"),
      (f"{section}.max_hole_area", _int_at_least(0), "an area in pixels >= 0 (0 = off)"),
      (f"{section}.split_h", _int_at_least(0),
       "an integer distance in pixels >= 0 (0 = no splitting of touching glands)"),
  ]


COMMON: list[Rule] = [
    ("seed", _int_at_least(0), "an integer >= 0"),
    ("data.val_count", _int_at_least(0), "an integer >= 0 (0 = no validation images)"),
    ("data.tile_size", _int_at_least(1), "a tile side in pixels >= 1 (112 in the paper)"),
    ("data.tile_stride", _int_at_least(1), "a stride in pixels >= 1 (56 in the paper)"),
    ("data.label_threshold", lambda v, c: _is_number(v) and 0 <= v < 1,
     "a fraction in [0, 1) (0.05 in the paper)"),
    ("data.synthetic_train", _int_at_least(1), "an integer >= 1 (synthetic train images)"),
    ("data.synthetic_test", _int_at_least(0), "an integer >= 0 (synthetic test images)"),
    ("model.backbone", _one_of(BACKBONES), "one of " + ", ".join(BACKBONES)),
    ("model.width", _positive, "a channel multiplier > 0 (1.0 = the paper's network)"),
    ("model.init_checkpoint",
     lambda v, c: not (isinstance(v, str) and v in NAMED_WEIGHTS) or v == _get(c, "model.backbone", ""),
     lambda: "'' (from scratch), a .pth path, or the weight name equal to model.backbone (the named "
             "ImageNet weights fit only their own EfficientNet-Lite variant)"),
    ("model.bn", _one_of(BN_MODES), "one of " + ", ".join(BN_MODES)),
    ("model.dtype", _one_of(DTYPES), "one of " + ", ".join(DTYPES)),
]

TRAIN: list[Rule] = [
    ("train.batch_size", _int_at_least(1), "a global batch size >= 1"),
    ("train.lr", _positive, "a learning rate > 0"),
    ("train.end_lr", _non_negative, "a learning rate >= 0"),
    ("train.power", _positive, "a poly exponent > 0"),
    ("train.momentum", lambda v, c: _is_number(v) and 0 <= v < 1, "a momentum in [0, 1)"),
    ("train.weight_decay", _non_negative, "a weight decay >= 0"),
    ("train.log_every", _int_at_least(1), "a number of steps >= 1"),
    ("train.eval_every", _int_at_least(0), "a number of steps >= 0 (0 = only at the end)"),
    ("train.distributed", _one_of(DISTRIBUTED), "one of " + ", ".join(DISTRIBUTED)),
    ("checkpoint.every", _int_at_least(0), "a number of steps >= 0 (0 = only at the end)"),
    ("checkpoint.keep", _int_at_least(1), "a number of checkpoints >= 1"),
    ("checkpoint.average_from", _average_from, _average_from_expected),
]


STAGE_RULES: dict[str, list[Rule]] = {
    "prepare": [],
    "cls": TRAIN + [
        ("train.steps", _int_at_least(0), "a number of steps >= 0 (0 = cls.epochs over the tiles)"),
        ("cls.epochs", _int_at_least(1), "a number of epochs >= 1"),
        ("cls.input_size", _int_at_least(8), "an input side in pixels >= 8"),
        ("cls.num_classes", lambda v, c: v == 2, "2 (non-gland, gland)"),
        ("cls.b7_dilation", _int_at_least(1), "a dilation >= 1"),
        ("cls.eval_batch_size", _int_at_least(1), "a batch size >= 1"),
        ("cls.num_eval_images", _int_at_least(0), "a count >= 0"),
        ("cls.stitch", _one_of(STITCH_MODES), "one of " + ", ".join(STITCH_MODES)),
        ("cls.stitch_temperature", _positive, "a temperature > 0 (CAM logit units)"),
    ],
    "seg": TRAIN + [
        ("train.steps", _int_at_least(1), "a number of steps >= 1"),
        ("seg.loss_kind", _one_of(LOSS_KINDS), "one of " + ", ".join(LOSS_KINDS)),
        ("seg.mask_source", _one_of(("pseudo", "true")), "one of pseudo, true"),
        ("seg.backbone_checkpoint", _checkpoint, CHECKPOINT_CHOICES),
        ("seg.aux_weight", _non_negative, "a weight >= 0"),
        ("seg.crop_size", _int_at_least(8), "a crop side in pixels >= 8"),
        ("seg.scale_min", _positive, "a rescale factor > 0"),
        ("seg.scale_max", lambda v, c: _is_number(v) and v >= _get(c, "seg.scale_min", 0),
         "a rescale factor >= seg.scale_min"),
        ("seg.num_classes", lambda v, c: v == 2, "2 (non-gland, gland)"),
        ("seg.b7_dilation", _int_at_least(1), "a dilation >= 1"),
        ("seg.eval_window", _int_at_least(8), "a window side in pixels >= 8"),
        ("seg.eval_stride", _stride("seg.eval_window"), "a stride in pixels in 1..seg.eval_window"),
        ("seg.eval_batch_size", _int_at_least(1), "a batch size >= 1"),
        ("seg.num_eval_images", _int_at_least(0), "a count >= 0"),
        ("seg.self_training_rounds", lambda v, c: _is_int(v) and v >= 0 and
         (v == 0 or _get(c, "seg.mask_source", "pseudo") == "pseudo"),
         "a number of rounds >= 0 (0 = none; > 0 only with seg.mask_source 'pseudo')"),
        ("seg.relabel_scales", _scales, "a non-empty tuple of scales > 0, e.g. (1.0,)"),
    ],
    "cam": [
        ("cam.checkpoint", _checkpoint, CHECKPOINT_CHOICES),
        ("cam.scales", _scales, "a non-empty tuple of scales > 0, e.g. (1.0, 1.5)"),
        ("cam.batch_size", _int_at_least(1), "a batch size >= 1"),
        ("cam.splits", _splits, "comma-separated names from " + ", ".join(SPLITS)),
        ("cam.stitch", _one_of(STITCH_MODES), "one of " + ", ".join(STITCH_MODES)),
        ("cam.stitch_temperature", _positive, "a temperature > 0 (CAM logit units)"),
    ],
    "eval": [
        ("eval.checkpoint", _checkpoint, CHECKPOINT_CHOICES),
        ("eval.splits", _splits, "comma-separated names from " + ", ".join(SPLITS)),
        *_sliding_window_rules("eval"),
    ],
}

STAGE_RULES["export"] = [
    ("export.checkpoint", lambda v, c: v == "" or _checkpoint(v, c),
     "'' (the checkpoint eval used), " + CHECKPOINT_CHOICES),
    ("export.pixel_size_um", lambda v, c: _is_number(v) and (v in (-1, 0) or v > 0),
     "-1 (auto), 0 (unknown) or a pixel size in µm/px > 0"),
]
STAGE_RULES["predict"] = [
    # predict.model and predict.inputs have no default; the stage names them when unset.
    ("predict.checkpoint", lambda v, c: v == "" or _checkpoint(v, c),
     "'' (the checkpoint eval used), " + CHECKPOINT_CHOICES),
    ("predict.input_mpp", _non_negative, "a pixel size in µm/px > 0, or 0 = from the file"),
    *_sliding_window_rules("predict"),
    ("predict.region_size", _int_at_least(16), "a region side >= 16 px (default 4096)"),
    ("predict.overlay_max_side", _int_at_least(16), "a side >= 16 px"),
    ("predict.tiff_mask_pixels", _int_at_least(0), "a pixel count >= 0"),
    ("predict.tissue_detection", _one_of(("auto", "on", "off")),
     "'auto' (on for images above predict.tiff_mask_pixels), 'on' or 'off'"),
    ("predict.simplify_px", _non_negative, "a tolerance in px >= 0 (0 = exact)"),
    ("predict.stain_z_max", _positive, "a number of standard deviations > 0"),
]

# The stages a pipeline can run, in the order it runs them; then the stages that stand alone. The one
# place the stage order is written: `validate`, the pipeline's stage_config, the command line's
# override hints and its "next:" lines read it from here.
PIPELINE_STAGES = ("prepare", "cls", "cam", "seg", "eval")
STAGES = PIPELINE_STAGES + ("pipeline", "export", "predict")
# Keys of a pipeline config that sit at its top level, not under stage_<name>.
_TOP_LEVEL = ("data.", "seed")


def check_rules(config, rules: Iterable[Rule]) -> None:
  """Raises ConfigError for the first rule whose key is present and whose value is refused."""
  for key, accept, expected in rules:
    value = _get(config, key, None)
    if value is None:
      continue
    if not accept(value, config):
      raise ConfigError(key, quote(value), expected() if callable(expected) else expected)


def pipeline_prefix(name: str, key: str) -> str:
  """The prefix a key of stage `name` takes in a pipeline config ("" for data.* and seed)."""
  return "" if any(key == t or key.startswith(t) for t in _TOP_LEVEL) else f"stage_{name}."


def stage_config(config, name: str):
  """The config of stage `name` inside a pipeline config (its `stage_<name>` section), with the
  pipeline's shared `data` and `seed` copied in and `stage` set to `name`.

  Args:
    config: a pipeline config (`configs/pipeline.py`).
    name: one of `PIPELINE_STAGES`.

  Returns:
    a new ml_collections.ConfigDict (the pipeline config is not changed).

  Raises:
    ConfigError: the pipeline config has no `stage_<name>` section.
  """
  import ml_collections

  key = f"stage_{name}"
  if key not in config:
    raise ConfigError("pipeline.stages", quote(_get(config, "pipeline.stages", "")),
                      f"stages that have a stage_<name> section (no {key})")
  sub = ml_collections.ConfigDict(config[key].to_dict())
  sub.stage = name
  sub.seed = config.seed
  sub.data = ml_collections.ConfigDict(config.data.to_dict())
  return sub


# (reading stage, key naming a checkpoint, key naming the folder it reads ("" = the pipeline's own),
#  the training stage that must write the average)
_READS_CHECKPOINT = (("cam", "cam.checkpoint", "cam.cls_dir", "cls"),
                     ("seg", "seg.backbone_checkpoint", "seg.backbone_init", "cls"),
                     ("eval", "eval.checkpoint", "eval.seg_dir", "seg"))


def _check_averages(config, names: Sequence[str]) -> None:
  """A pipeline stage that reads the 'average' checkpoint of a training stage the same pipeline
  trains needs that stage's checkpoint.average_from > 0 (else it would stop after hours of training).
  """
  for reader, key, folder_key, trainer in _READS_CHECKPOINT:
    if reader not in names or trainer not in names:
      continue
    sub = config[f"stage_{reader}"]
    folder = str(_get(sub, folder_key, ""))
    if _get(sub, key, None) != "average" or folder not in ("", "cls"):
      continue
    if not int(_get(config[f"stage_{trainer}"], "checkpoint.average_from", 0) or 0) > 0:
      raise ConfigError(f"stage_{reader}.{key}", "'average'",
                        f"'best' or 'latest' unless stage_{trainer}.checkpoint.average_from > 0 (it is "
                        f"0: stage {trainer} writes no averaged checkpoint)")


def validate(config) -> None:
  """Checks `config` for `config.stage` (see the module docstring).

  Raises:
    ConfigError: the first bad value.
  """
  stage = _get(config, "stage", None)
  if stage == "pipeline":
    names = _names(_get(config, "pipeline.stages", ""))
    bad = [n for n in names if n not in PIPELINE_STAGES]
    if bad or not names:
      raise ConfigError("pipeline.stages", quote(_get(config, "pipeline.stages", "")),
                        "comma-separated stages from " + ", ".join(PIPELINE_STAGES))
    for name in names:
      sub = stage_config(config, name)  # refuses a stage without its stage_<name> section
      try:
        validate(sub)
      except ConfigError as e:
        raise e.with_prefix(pipeline_prefix(name, e.key)) from None
    _check_averages(config, names)
    return
  if stage not in STAGES:
    raise ConfigError("stage", quote(stage), "one of " + ", ".join(STAGES))
  check_rules(config, COMMON)
  check_rules(config, STAGE_RULES[stage])
