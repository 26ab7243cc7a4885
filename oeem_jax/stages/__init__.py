"""Stage registry. Each stage is a module `oeem_jax.stages.<name>` with

    run(config: ml_collections.ConfigDict, stage_dir: pathlib.Path) -> dict

that does its work inside `stage_dir` (= WORKDIR/<name>) and returns the stage's results.
`run_stage` adds the common fields and writes `WORKDIR/<name>/summary.json` atomically, so every
stage (and the pipeline, which calls `run_stage` for each of its stages) follows one pattern.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from oeem_jax import io_utils

STAGES = ("prepare", "cls", "cam", "seg", "eval", "pipeline")


def stage_dir(workdir: str | Path, stage: str) -> Path:
  return Path(workdir) / stage


def summary_path(workdir: str | Path, stage: str) -> Path:
  return stage_dir(workdir, stage) / "summary.json"


def run_stage(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Runs `config.stage` in `workdir` and writes `WORKDIR/<stage>/summary.json`.

  Raises:
    ValueError: `config.stage` is not one of `STAGES`.
  """
  stage = config.stage
  if stage not in STAGES:
    raise ValueError(f"config key 'stage' is {stage!r}; expected one of {', '.join(STAGES)}")
  module = importlib.import_module(f"oeem_jax.stages.{stage}")
  out_dir = stage_dir(workdir, stage)
  out_dir.mkdir(parents=True, exist_ok=True)
  logging.info("stage %s: workdir %s", stage, out_dir)
  start = time.time()
  result = module.run(config, out_dir) or {}
  summary = {
      "stage": stage,
      "config": config.to_dict(),
      "wall_time_s": round(time.time() - start, 3),
      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  summary.update(result)
  import jax

  if jax.process_index() == 0:  # one writer on a shared filesystem
    io_utils.atomic_write_json(summary_path(workdir, stage), summary)
  logging.info("stage %s done in %.1f s; summary: %s", stage, summary["wall_time_s"],
               summary_path(workdir, stage))
  return summary


def training_config(train_stage_dir: str | Path,
                    fallback: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config a training stage ran with (from its summary.json), so that a later stage rebuilds
  exactly the network it trained (width, dilation, classes, dtype).

  Falls back to `fallback` (the calling stage's own config, which carries `model` and the training
  stage's section with the same defaults) when that summary does not exist.
  """
  import json

  path = Path(train_stage_dir) / "summary.json"
  if not path.is_file():
    logging.warning("%s not found; building the network from this stage's own config", path)
    return fallback
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f)["config"])


def imagenet_init_hook(config: ml_collections.ConfigDict, stage: str):
  """The `train_loop(pretrained=...)` hook that loads `model.init_checkpoint` (the reference's
  ImageNet `res38d.pth`, non-strictly, REFERENCE.md §2/§4), or None when that key is empty.

  Raises:
    FileNotFoundError: `model.init_checkpoint` names a file that does not exist.
  """
  if not config.model.get("init_checkpoint", ""):
    return None
  path = Path(config.model.init_checkpoint).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"config key model.init_checkpoint: {path} does not exist")

  def load_weights(variables):
    from oeem_jax.models.import_torch import load_res38d

    new, report = load_res38d(path, variables)
    logging.info("%s: loaded %d tensors from %s (missing %d, unexpected %d)", stage,
                 len(report["used"]), path, len(report["missing"]), len(report["unexpected"]))
    return new

  return load_weights
