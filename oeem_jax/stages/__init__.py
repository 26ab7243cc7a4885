"""Stage registry. Each stage is a module `oeem_jax.stages.<name>` with

    run(config: ml_collections.ConfigDict, stage_dir: pathlib.Path) -> dict

that does its work inside `stage_dir` (= WORKDIR/<name>) and returns the stage's results.
`run_stage` is one run (the config checked once, then the stage); `execute_stage` adds the common
fields and writes `WORKDIR/<name>/summary.json` atomically, so every stage (and the pipeline, which
calls `execute_stage` for each of its stages) follows one pattern.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from absl import logging

from oeem_jax.runtime import io_utils
from oeem_jax.runtime.artifacts import stage_dir, summary_path  # the workdir layout

if TYPE_CHECKING:  # annotations only: importing this package needs no ml_collections
  import ml_collections


def run_stage(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """One run: checks `config` once (`config.check.validate`, before anything is written or JAX is
  imported), starts `jax.distributed` where the config asks for it (`train.distributed`; before
  anything touches a device), then runs `config.stage` in `workdir` (`execute_stage`).

  `python -m oeem_jax.main` calls this once per command; call it the same way from Python.

  Returns:
    the stage's summary (what `execute_stage` returns).

  Raises:
    errors.ConfigError: a bad config value (also `config.stage` not one of `STAGES`).
  """
  from oeem_jax.config import check as config_check

  config_check.validate(config)
  # A pipeline config carries the switch in its training stages' sections.
  section = config.get("train") or config.get("stage_cls", {}).get("train") or {}
  from oeem_jax.engine.parallel import setup_distributed

  setup_distributed(section.get("distributed", "auto"))
  return execute_stage(config, workdir)


def execute_stage(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Runs `config.stage` in `workdir` and writes `WORKDIR/<stage>/summary.json`; `config` has been
  checked already (`run_stage` does it once per run; the pipeline runs its stages through here).

  The summary holds the config, the wall time and an `environment` block (package versions, CPU model and SIMD
  features, JAX device kind and counts, source commit: `env_info.environment`) besides the stage's
  own fields. A stage that fails leaves no folder behind that holds no file (a failed data check,
  for example, no longer leaves an empty `WORKDIR/prepare/`).
  """
  from oeem_jax.runtime import env_info

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
