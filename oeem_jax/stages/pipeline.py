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

import ml_collections  # noqa: F401  (annotations)
from absl import logging

from oeem_jax import stages
from oeem_jax.config.check import pipeline_prefix, stage_config
from oeem_jax.errors import ConfigError
from oeem_jax.runtime.artifacts import summary_path

# Fields of each stage's summary carried into the pipeline's summary.
_KEEP = ("wall_time_s", "synthetic", "steps", "best_eval", "final_eval", "params_digest", "cam_miou",
         "pseudo_mask_miou", "metrics", "predictions_dir", "pseudo_mask_dir")


def run(config: ml_collections.ConfigDict, stage_dir: Path) -> dict[str, Any]:
  """Runs the pipeline's stages in order; returns per-stage summaries and the final table."""
  workdir = stage_dir.parent  # stage_dir = artifacts.stage_dir(workdir, "pipeline")
  # config.check.validate checked the names and every stage's section before the run started.
  names = [s.strip() for s in str(config.pipeline.stages).split(",") if s.strip()]
  results: dict[str, Any] = {}
  summary = {}
  for i, name in enumerate(names):
    done = summary_path(workdir, name)
    if done.is_file():
      logging.info("pipeline [%d/%d] %s: complete (%s exists), skipped", i + 1, len(names), name, done)
      with open(done) as f:
        summary = json.load(f)
    else:
      logging.info("pipeline [%d/%d] %s: running", i + 1, len(names), name)
      try:
        summary = stages.execute_stage(stage_config(config, name), workdir)
      except ConfigError as e:  # name the key as it is written in the pipeline config
        raise e.with_prefix(pipeline_prefix(name, e.key)) from e
    results[name] = {k: summary[k] for k in _KEEP if k in summary}
  return {"stages": results, "final_line": summary.get("final_line", "")}
