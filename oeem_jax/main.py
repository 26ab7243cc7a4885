r"""Command-line entry point.

    python -m oeem_jax.main --config=configs/<file>.py[:arg] --workdir=DIR [--config.key=value ...]

The config names the stage (`config.stage`); results go to `DIR/<stage>/` with a `summary.json`.
`--help` lists the configs and their arguments. Errors in the input (bad data, a bad config value,
a config file or key that does not exist, a checkpoint of another run in DIR) end with one line
`error: ...` on stderr and exit status 2; `--verbosity=1` adds the traceback and the libraries'
INFO log lines, which the default log leaves out.
"""

from __future__ import annotations

import difflib
import logging as pylogging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

# --config is defined by `parse_flags` once it has loaded the config file (`check_command_line`):
# absl then applies the --config.KEY=VALUE overrides to that ConfigDict, so the file is executed once
# per run (absl's own DEFINE_config_file would execute it a second time).
_CONFIG_HELP = "Path to a config file in configs/, optionally with ':arg' (e.g. configs/cls.py:cpu)."
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; a run restarted in the same folder resumes.")
flags.mark_flags_as_required(["workdir"])

EXIT_INPUT_ERROR = 2
_HELP_ARGS = ("-?", "-h", "--help", "-help", "--helpshort", "-helpshort", "--helpfull", "-helpfull")


class UsageError(Exception):
  """A command line that cannot run (config file, argument or key); main prints it as one line."""


def _configs_dir() -> Path:
  from oeem_jax.config.base import CONFIGS_DIR
  return CONFIGS_DIR


def _display(path: Path) -> str:
  try:
    return os.path.relpath(path)
  except ValueError:
    return str(path)


def configs_help() -> str:
  """The configs in the source checkout's configs/ with their first docstring line and their
  arguments (each config module's `ARGS`: {arg: description})."""
  from oeem_jax.config.base import load_config_file

  lines = [f"configs (in {_display(_configs_dir())}/; '--config=FILE.py:ARG' picks an argument):"]
  for path in sorted(_configs_dir().glob("*.py")):
    try:
      module = load_config_file(path.stem, path.parent)
    except Exception as e:  # a broken config must not break --help
      lines.append(f"  {path.name:14s} (cannot be loaded: {type(e).__name__}: {e})")
      continue
    para = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
    first = para.split(". ")[0].rstrip(".") + "."
    lines.append(f"  {path.name:14s} {first}")
    for arg, what in getattr(module, "ARGS", {"": ""}).items():
      lines.append(f"      {(':' + arg) if arg else '(no arg)':12s} {what}")
  return "\n".join(lines)


def print_help(full: bool = False) -> None:
  print((__doc__ or "").strip())
  print()
  print(configs_help())
  print()
  print("flags:\n  --config=FILE.py[:ARG]   a config above\n  --workdir=DIR            output folder "
        "(a rerun in it resumes)\n  --config.KEY=VALUE       override one config key (in a pipeline "
        "config: --config.stage_<stage>.KEY, except data.* and seed)\n  --verbosity=1            "
        "debug log: library INFO lines and tracebacks on errors\n  --helpfull               every "
        "flag of every library")
  if full:
    print()
    print(flags.FLAGS.get_help())


# ---------------------------------------------------------------------------------------------------
# Command line checks before absl parses it (absl would print a traceback or "FATAL Flags parsing")


def _config_arg(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    for name in ("--config", "-config"):
      if a == name and i + 1 < len(argv):
        return argv[i + 1]
      if a.startswith(name + "="):
        return a[len(name) + 1:]
  return None


def _overrides(argv: list[str]) -> list[tuple[str, str | None]]:
  """(dotted key, value text or None) of every `--config.KEY[=VALUE]` argument."""
  out = []
  for a in argv:
    m = re.match(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$", a, re.S)
    if m:
      out.append((m.group(1), m.group(2)))
  return out


def _leaf_keys(config, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    if hasattr(v, "items"):
      out += _leaf_keys(v, f"{prefix}{k}.")
    out.append(prefix + k)
  return out


def _has_key(config, key: str) -> bool:
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def check_command_line(argv: list[str]):
  """Loads the `--config` file and checks every `--config.KEY` against it.

  Returns:
    the loaded config (None when no --config was given: absl reports the missing flag).

  Raises:
    UsageError: the config file does not exist, get_config refuses the argument, or an override
      names a key the config does not have (for a pipeline config, the message names the
      stage_<stage>. keys that do exist).
  """
  from oeem_jax.config.base import load_config_file

  spec = _config_arg(argv)
  if spec is None:
    return None
  path_text, _, arg = spec.partition(":")
  path = Path(path_text).expanduser()
  if not path.is_file():
    known = ", ".join(_display(p) for p in sorted(_configs_dir().glob("*.py")))
    raise UsageError(f"--config: {path_text!r} is not a file; expected one of {known} "
                     "(optionally with :ARG; --help lists them)")
  try:
    module = load_config_file(path.stem, path.parent)
    config = module.get_config(arg or None) if arg else module.get_config()
  except ValueError as e:  # the configs' own refusal of an unknown argument
    raise UsageError(f"--config={spec}: {e}") from e
  for key, value in _overrides(argv):
    if _has_key(config, key):
      continue
    given = f"{value!r}" if value is not None else "given"
    if config.get("stage") == "pipeline":
      from oeem_jax.config.check import PIPELINE_STAGES

      stages_with = [s for s in PIPELINE_STAGES
                     if f"stage_{s}" in config and _has_key(config[f"stage_{s}"], key)]
      if stages_with:
        alts = " or ".join(f"--config.stage_{s}.{key}" for s in stages_with)
        raise UsageError(f"config key {key}: {given}, but {_display(path)} is a pipeline config "
                         f"and has no {key}; expected the stage's prefix: {alts}")
    close = difflib.get_close_matches(key, _leaf_keys(config), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UsageError(f"config key {key}: {given}, but {_display(path)} has no such key; expected a key "
                     f"of that config{hint}")
  return config


_FLAG_VALUE_RE = re.compile(r"flag --config\.([^=]+)=(.*?): (.*)$", re.S)


def _flags_error_line(message: str, config) -> str:
  """One line for an absl flags error, naming the config key and the expected type."""
  m = _FLAG_VALUE_RE.match(message.strip())
  if m and config is not None:
    key, value, why = m.groups()
    node = config
    try:
      for part in key.split("."):
        node = node[part]
      want = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
              tuple: "a tuple, e.g. (1.0, 1.5)"}.get(type(node), type(node).__name__)
    except (KeyError, TypeError):
      want = "a value of the key's type"
    return f"config key {key}: {value!r}; expected {want} ({why.strip().splitlines()[-1]})"
  return " ".join(message.split())


def _without_config_spec(argv: list[str]) -> list[str]:
  """`argv` without its `--config=FILE[:ARG]` (or `--config FILE[:ARG]`); the overrides stay."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    if a in ("--config", "-config"):
      skip = True
      continue
    if a.startswith(("--config=", "-config=")):
      continue
    out.append(a)
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser`: help (exit 0), command-line checks and absl parsing; a bad command line
  prints one `error:` line and exits 2.

  The config file is executed once (`check_command_line`); its ConfigDict becomes the `--config`
  flag (`config_flags.DEFINE_config_dict`, locked), to which absl applies the overrides.
  """
  if any(a in _HELP_ARGS for a in argv[1:]):
    print_help(full=any(a.endswith("helpfull") for a in argv[1:]))
    sys.exit(0)
  config = None
  try:
    config = check_command_line(argv)
    if config is None:
      raise UsageError("--config: missing; expected --config=configs/<file>.py[:ARG] (--help lists them)")
    rest = _without_config_spec(argv)
    if "config" not in flags.FLAGS:
      # sys_argv: where it finds the overrides to define as flags (without the file spec, which
      # DEFINE_config_dict would take for a value of its own).
      config_flags.DEFINE_config_dict("config", config, _CONFIG_HELP, lock_config=True, sys_argv=rest)
    return flags.FLAGS(rest)
  except UsageError as e:
    _fail(str(e), e)
  except flags.Error as e:
    _fail(_flags_error_line(str(e), config), e)
  except (KeyError, OSError) as e:  # what ml_collections raises for what the checks above missed
    _fail(f"{type(e).__name__}: {e}", e)
  raise AssertionError("unreachable")


def _fail(line: str, exc: BaseException | None = None) -> None:
  debug = any(re.match(r"^--?v(erbosity)?=?[1-9]", a) for a in sys.argv[1:])
  if exc is not None and (debug or (flags.FLAGS.is_parsed() and logging.level_debug())):
    traceback.print_exception(exc)
  print(f"error: {line}", file=sys.stderr)
  sys.exit(EXIT_INPUT_ERROR)


# ---------------------------------------------------------------------------------------------------
# The default log: our own lines and every warning, without the libraries' INFO chatter


class _QuietLibraries(pylogging.Filter):
  """Drops records below WARNING from code outside oeem_jax (TFDS, JAX, orbax), unless
  --verbosity >= 1. The known-harmless orbax warnings are dropped by `checkpoint.quiet_orbax_logs`."""

  _PACKAGE = str(Path(__file__).resolve().parent)

  def filter(self, record: pylogging.LogRecord) -> bool:
    if logging.level_debug():
      return True
    ours = record.pathname.startswith(self._PACKAGE)
    return ours or record.levelno >= pylogging.WARNING


def quiet_logs() -> None:
  """Installs `_QuietLibraries` on absl's handler (idempotent), silences TensorFlow's C++ INFO lines
  unless --verbosity >= 1 and turns TensorFlow's oneDNN custom ops off unless $TF_ENABLE_ONEDNN_OPTS
  says otherwise (both environment variables are read when TensorFlow is imported, after this)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  if not logging.level_debug():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  # TensorFlow's oneDNN custom ops pick their kernels by CPU and may round differently from one
  # machine to the next. Off, the demo's parameters are bit-identical to on (measured, issue 13), so
  # they are off unless asked for: one source of machine dependence less, and no notice in the log.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def next_steps(summary: dict, workdir: str, config_spec: str = "") -> list[str]:
  """The lines printed after a stage's final line: where its results are and what to run next.

  Args:
    summary: what `stages.run_stage` returned.
    workdir: the --workdir.
    config_spec: the --config value (its ':arg' is carried over to the suggested next stage).
  """
  from oeem_jax.runtime.artifacts import stage_dir

  stage = summary.get("stage", "")
  out = stage_dir(workdir, stage)
  synthetic = bool(summary.get("synthetic") or summary.get("synthetic_data") or (
      summary.get("stages", {}).get("eval", {}).get("synthetic")))
  arg = config_spec.partition(":")[2]
  glas = "--config.data.dir=/path/to/glas"
  lines = []
  if stage == "pipeline" and "eval" not in summary.get("stages", {}):  # e.g. pipeline.stages=cls,cam
    return [f"results: {workdir}/ (each stage's summary.json)",
            "next: the same command without --config.pipeline.stages runs the remaining stages "
            "(finished ones are skipped)"]
  if stage in ("pipeline", "eval"):
    ev = stage_dir(workdir, "eval")
    lines.append(f"results: {ev}/metrics.json and per_image.csv, predictions in {ev}/predictions/, "
                 f"contours in {ev}/overlays/; every stage's summary.json under {workdir}/")
    if synthetic:
      lines.append("next: the same on GlaS (about an hour on 2 CPU cores): pip install -e "
                   "'.[pretrained]' -c constraints.txt && python -m oeem_jax.main "
                   f"--config=configs/pipeline.py:cpu {glas} --workdir=runs/cpu")
    else:
      lines.append(f"next: tensorboard --logdir {workdir}; the plain-CE baseline: the same command "
                   "with --config.stage_seg.seg.loss_kind=ce and another --workdir")
    return lines
  lines.append(f"results: {out}/ (summary.json)")
  if stage == "export":
    model = summary.get("model_dir") or f"{out}/model"
    lines.append(f"next: python -m oeem_jax.main --config=configs/predict.py --config.predict.model={model} "
                 "--config.predict.inputs='my_images/*.tif' --workdir=OUT")
  elif stage == "prepare" and synthetic:
    lines.append(f"next: python -m oeem_jax.main --config=configs/pipeline.py:demo --workdir={workdir}")
  else:
    from oeem_jax.config.check import PIPELINE_STAGES

    order = list(PIPELINE_STAGES)
    after = order[order.index(stage) + 1] if stage in order[:-1] else None
    follow = {"seg": "seg_oeem.py"}.get(after, f"{after}.py") if after else None
    if follow:
      arg_next = arg if arg in ("cpu", "cpu_scratch", "demo") else ""
      if arg_next == "demo" and follow in ("cls.py", "seg_oeem.py"):
        arg_next = "cpu_scratch"
      lines.append(f"next: python -m oeem_jax.main --config=configs/{follow}"
                   f"{':' + arg_next if arg_next else ''} --workdir={workdir}"
                   + ("" if synthetic else f" {glas}"))
  return lines


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}; expected only --flags")
  logging.get_absl_handler().use_absl_log_file = False
  quiet_logs()
  warnings.filterwarnings("ignore", category=UserWarning, module=r"oeem_jax\.")  # logged as well
  config = flags.FLAGS["config"].value
  from oeem_jax import errors, stages  # import after flag parsing keeps --help fast

  try:
    # One run: the config checked once (before TensorFlow and JAX are imported: a bad value fails in
    # a second), jax.distributed where asked, then the stage.
    summary = stages.run_stage(config, _WORKDIR.value)
  except (errors.ConfigError, errors.GlasDataError, FileNotFoundError, errors.MissingExtraError) as e:
    # Bad input or a missing optional install: one clear line instead of a traceback (nothing
    # half-written was left).
    _fail(str(e), e)
  line = summary.get("final_line")
  if line:
    print(line)
  for extra in next_steps(summary, _WORKDIR.value, _config_arg(sys.argv) or ""):
    print(extra)
  # A stage that finished but could not do everything (predict: some images failed) says so.
  status = int(summary.get("exit_status", 0) or 0)
  if status:
    sys.exit(status)


def run():
  # Before anything else: may replace this process by itself with glibc's huge-page malloc tunable
  # (XLA:CPU's per-step buffers; about 1.5x faster on 2 cores, same numbers; oeem_jax/runtime/malloc_env.py).
  from oeem_jax.runtime import malloc_env
  malloc_env.ensure_hugetlb()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  sys.exit(run())
