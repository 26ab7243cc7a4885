r"""Command-line entry point.

    python -m oeem_jax.main --config=configs/<stage>.py[:arg] --workdir=DIR [--config.x.y=value ...]

The config names the stage (`config.stage`); results go to `DIR/<stage>/` with a `summary.json`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/, optionally with ':arg' (e.g. configs/cls.py:cpu).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; a run restarted in the same folder resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().use_absl_log_file = False
  from oeem_jax import stages  # import after flag parsing keeps --help fast
  from oeem_jax.data.glas import GlasDataError
  from oeem_jax.models.import_torch import MissingExtraError

  from oeem_jax import train

  config = _CONFIG.value
  # jax.distributed.initialize() must come before anything touches a device; a pipeline config
  # carries the switch in its training stages' sections.
  section = config.get("train") or config.get("stage_cls", {}).get("train") or {}
  train.setup_distributed(section.get("distributed", "auto"))
  try:
    summary = stages.run_stage(config, _WORKDIR.value)
  except (GlasDataError, FileNotFoundError, MissingExtraError) as e:
    # Bad input or a missing optional install: one clear message instead of a traceback (nothing
    # half-written was left).
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  line = summary.get("final_line")
  if line:
    print(line)
  # A stage that finished but could not do everything (predict: some images failed) says so.
  status = int(summary.get("exit_status", 0) or 0)
  if status:
    sys.exit(status)


def run():
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
