"""Stage registry. Each stage is a module `oeem_jax.stages.<name>` with

    run(config: ml_collections.ConfigDict, stage_dir: pathlib.Path) -> dict

that does its work inside `stage_dir` (= WORKDIR/<name>) and returns the stage's results.
`run_stage` adds the common fields and writes `WORKDIR/<name>/summary.json` atomically, so every
stage (and the pipeline, which calls `run_stage` for each of its stages) follows one pattern.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from absl import logging

from oeem_jax import io_utils
from oeem_jax.artifacts import stage_dir, summary_path  # the workdir layout (oeem_jax.artifacts)

if TYPE_CHECKING:  # annotations only: importing this package needs no ml_collections
  import ml_collections

STAGES = ("prepare", "cls", "cam", "seg", "eval", "pipeline", "export", "predict")




def run_stage(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Runs `config.stage` in `workdir` and writes `WORKDIR/<stage>/summary.json`.

  The config is checked first (`config_check.validate`), before anything is written. The summary
  holds the config, the wall time and an `environment` block (package versions, CPU model and SIMD
  features, JAX device kind and counts, source commit: `env_info.environment`) besides the stage's
  own fields. A stage that fails leaves no folder behind that holds no file (a failed data check,
  for example, no longer leaves an empty `WORKDIR/prepare/`).

  Raises:
    config_check.ConfigError: a bad config value (also `config.stage` not one of `STAGES`).
  """
  from oeem_jax import config_check, env_info

  config_check.validate(config)
  stage = config.stage
  module = importlib.import_module(f"oeem_jax.stages.{stage}")
  out_dir = stage_dir(workdir, stage)
  created = [p for p in (Path(workdir), out_dir) if not p.exists()]
  out_dir.mkdir(parents=True, exist_ok=True)
  logging.info("stage %s: workdir %s", stage, out_dir)
  start = time.time()
  try:
    result = module.run(config, out_dir) or {}
  except BaseException:
    for p in reversed(created):  # the stage folder, then the workdir if this call made them
      io_utils.remove_if_empty(p)
    raise
  summary = {
      "stage": stage,
      "config": config.to_dict(),
      "wall_time_s": round(time.time() - start, 3),
      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "environment": env_info.environment(),
  }
  summary.update(result)
  import jax

  if jax.process_index() == 0:  # one writer on a shared filesystem
    io_utils.atomic_write_json(summary_path(workdir, stage), summary)
  logging.info("stage %s done in %.1f s; summary: %s", stage, summary["wall_time_s"],
               summary_path(workdir, stage))
  return summary


class ImageNetInit:
  """`train_loop(pretrained=...)` hook loading `model.init_checkpoint` into the backbone.

  ResNet38: the reference's `res38d.pth` (`import_torch.load_res38d`); EfficientNet-Lite0: the name
  "efficientnet_lite0" or a .pth path (`import_torch.load_efficientnet_lite`, converted once and
  cached under the data cache). Non-strict, as the reference (paper §2.3, docs: ImageNet heads
  dropped). After a call, `report` holds the counts and the names of the missing / unexpected keys
  for the stage summary.
  """

  def __init__(self, config: ml_collections.ConfigDict, stage: str):
    from oeem_jax.models import classifier

    self.stage = stage
    self.spec = str(config.model.init_checkpoint)
    self.backbone = classifier.check_backbone(str(config.model.get("backbone", "resnet38")))
    self.cache_dir = None
    self.report: dict[str, Any] = {}
    if self.backbone == "resnet38":
      path = Path(self.spec).expanduser()
      if not path.is_file():
        raise FileNotFoundError(f"config key model.init_checkpoint: {path} does not exist (expected "
                                "the reference's res38d.pth for model.backbone 'resnet38')")
    else:
      from oeem_jax.data.glas import cache_root
      from oeem_jax.models.import_torch import resolve_pretrained

      resolve_pretrained(self.spec)  # fail before any training starts: missing package or file
      self.cache_dir = cache_root(config.data)

  def __call__(self, variables):
    from oeem_jax.models import import_torch

    if self.backbone == "resnet38":
      new, report = import_torch.load_res38d(self.spec, variables)
    else:
      new, report = import_torch.load_efficientnet_lite(self.spec, variables, cache_dir=self.cache_dir)
    self.report = {"source": self.spec, "backbone": self.backbone,
                   "num_used": len(report["used"]), "missing": report["missing"],
                   "unexpected": report["unexpected"]}
    logging.info("%s: loaded %d ImageNet tensors from %s into the %s backbone (missing %d, "
                 "unexpected %d: %s)", self.stage, len(report["used"]), self.spec, self.backbone,
                 len(report["missing"]), len(report["unexpected"]),
                 ", ".join(report["unexpected"][:4]) + (" ..." if len(report["unexpected"]) > 4 else ""))
    return new


def imagenet_init_hook(config: ml_collections.ConfigDict, stage: str) -> ImageNetInit | None:
  """An `ImageNetInit` hook for `model.init_checkpoint`, or None when that key is empty.

  Raises:
    FileNotFoundError: `model.init_checkpoint` names a file that does not exist.
    ImportError: a named weight package (or torch) is not installed; the message gives the pip command.
    ValueError: unknown `model.backbone`.
  """
  if not config.model.get("init_checkpoint", ""):
    return None
  return ImageNetInit(config, stage)


def input_stats(config: ml_collections.ConfigDict):
  """Input normalisation (mean, std) on 0..255 RGB of `config.model.backbone` for every stage that
  feeds its networks (`data.pipeline.input_stats`); None = ResNet38's per-stage defaults."""
  from oeem_jax.data.pipeline import input_stats as stats_of
  return stats_of(str(config.model.get("backbone", "resnet38")))


# What a training stage's network takes as input when its folder has no network card (older runs).
_INPUT_SIZE_KEY = {"cls": "input_size", "seg": "crop_size"}


@dataclasses.dataclass(frozen=True)
class TrainedNetwork:
  """A training stage's network, rebuilt for a later stage.

  Attributes:
    model: the flax module (`CAMClassifier` for cls, `PSPNet` for seg) with the constructor arguments
      it trained with.
    normalize: uint8 / float 0..255 RGB [..., 3] -> float32 network input, as in training.
    input_size: side in pixels of the training inputs (cls: tiles, seg: crops).
    card: the network card (`models.factory.network_card`) it was built from.
  """
  model: Any
  normalize: Callable[[Any], Any]
  input_size: int
  card: dict[str, Any]


def trained_network(train_stage_dir: str | Path, stage: str) -> TrainedNetwork:
  """Rebuilds the network a training stage (`stage` = "cls" or "seg") trained in `train_stage_dir`.

  Reads `network.json`, which the stage writes beside its checkpoints when training starts
  (`artifacts.read_network_card`), so an unfinished or preempted run works too. A folder of an
  older version without it falls back to the config in its `summary.json`.

  Raises:
    FileNotFoundError: the folder has neither file (not a `stage` training folder).
    ValueError: an unreadable card, a card of another stage, or arguments the network does not take.
  """
  from oeem_jax import artifacts
  from oeem_jax.data.pipeline import normalizer
  from oeem_jax.models import factory

  folder = Path(train_stage_dir)
  card = artifacts.read_network_card(folder)
  if card is None:
    trained = artifacts.training_config(folder)
    if trained is None:
      raise FileNotFoundError(
          f"{folder}: no {artifacts.network_card_path(folder).name} and no summary.json; expected the "
          f"folder of a {stage} training stage (python -m oeem_jax.main --config=configs/{stage}.py ...)")
    logging.info("%s has no network card (an older run): the network comes from its summary.json", folder)
    make = factory.make_classifier if stage == "cls" else factory.make_segmenter
    card = factory.network_card(make(trained), input_kind=stage, input_stats=input_stats(trained),
                                input_size=int(trained[stage][_INPUT_SIZE_KEY[stage]]))
  kind = card.get("input", {}).get("kind")
  if kind != stage:
    raise ValueError(f"{artifacts.network_card_path(folder)}: the network of a {kind!r} stage; expected "
                     f"a {stage!r} stage folder")
  stats = card["input"].get("stats")
  return TrainedNetwork(model=factory.network_from_card(card),
                        normalize=normalizer(stage, None if stats is None else tuple(map(tuple, stats))),
                        input_size=int(card["input"]["size"]), card=card)
