"""Stage `pipeline`: runs cls -> cam -> seg -> eval in one workdir (configs/pipeline.py).

Each stage runs with its own config (`config.stage_<name>`) into which the top-level `data` and
`seed` are copied. A stage whose `WORKDIR/<stage>/summary.json` exists is complete and skipped, so an
interrupted pipeline continues where it stopped; a training stage that was cut short has no summary
yet and resumes from its last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from oeem_jax import stages
from oeem_jax.config_check import ConfigError, pipeline_prefix

# Fields of each stage's summary carried into the pipeline's summary.
_KEEP = ("wall_time_s", "synthetic", "steps", "best_eval", "final_eval", "params_digest", "cam_miou",
         "pseudo_mask_miou", "metrics", "predictions_dir", "pseudo_mask_dir")


def stage_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The config of stage `name` inside a pipeline config, with the shared `data` and `seed`."""
  key = f"stage_{name}"
  if key not in config:
    raise ConfigError("pipeline.stages", repr(config.pipeline.stages),
                      f"stages that have a {key} section")
  sub = ml_collections.ConfigDict(config[key].to_dict())
  sub.stage = name
  sub.seed = config.seed
  sub.data = ml_collections.ConfigDict(config.data.to_dict())
  return sub


def run(config: ml_collections.ConfigDict, stage_dir: Path) -> dict[str, Any]:
  """Runs the pipeline's stages in order; returns per-stage summaries and the final table."""
  workdir = stage_dir.parent  # stage_dir = artifacts.stage_dir(workdir, "pipeline")
  names = [s.strip() for s in str(config.pipeline.stages).split(",") if s.strip()]
  for name in names:
    if name not in stages.STAGES or name == "pipeline":
      raise ConfigError("pipeline.stages", repr(config.pipeline.stages),
                        f"some of cls, cam, seg, eval (and prepare); {name!r} is not a stage")
  results: dict[str, Any] = {}
  summary = {}
  for i, name in enumerate(names):
    done = stages.summary_path(workdir, name)
    if done.is_file():
      logging.info("pipeline [%d/%d] %s: complete (%s exists), skipped", i + 1, len(names), name, done)
      with open(done) as f:
        summary = json.load(f)
    else:
      logging.info("pipeline [%d/%d] %s: running", i + 1, len(names), name)
      try:
        summary = stages.run_stage(stage_config(config, name), workdir)
      except ConfigError as e:  # name the key as it is written in the pipeline config
        raise e.with_prefix(pipeline_prefix(name, e.key)) from e
    results[name] = {k: summary[k] for k in _KEEP if k in summary}
  return {"stages": results, "final_line": summary.get("final_line", "")}
