"""The command line (`python -m oeem_jax.main`): --help, one-line errors with exit status 2, the
quiet default log and its last lines, files that respect the umask, no folder left by a failed run.

Each error case runs the real entry point in a subprocess; the config checks run before TensorFlow
or JAX is imported, so each costs about a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oeem_jax import errors, stages
from oeem_jax.config import check as config_check
from oeem_jax.config.base import get_base_config, load_config_file
from oeem_jax.runtime import io_utils

REPO = Path(__file__).resolve().parents[1]


def _main(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get(
      "PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "oeem_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, lines  # each error once, nothing else
  assert lines[0].startswith("error: ")
  return lines[0]


def test_help_lists_every_config_and_its_arguments_and_exits_0():
  proc = _main("--help")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  for path in sorted((REPO / "configs").glob("*.py")):
    assert f"  {path.name} " in out, path.name
    for arg in load_config_file(path.stem).ARGS:
      if arg:
        assert f":{arg} " in out, (path.name, arg)
  assert ":demo " in out and "--config.stage_<stage>.KEY" in out and "--verbosity=1" in out


def test_every_listed_argument_builds_and_others_are_refused():
  for path in sorted((REPO / "configs").glob("*.py")):
    module = load_config_file(path.stem)
    for arg in module.ARGS:
      c = module.get_config(arg or None)
      config_check.validate(c)  # the shipped configs pass their own checks
    with pytest.raises(ValueError, match="unknown argument 'gpu'"):
      module.get_config("gpu")


@pytest.mark.parametrize("args, line", [
    # bad values (config_check.validate, before anything is imported or written)
    (["--config=configs/seg_oeem.py:cpu_scratch", "--config.seg.loss_kind=foo"],
     "error: config key seg.loss_kind: 'foo'; expected one of ce, oeem, c_max, c_diff, lc_mix, ohem"),
    (["--config=configs/cls.py:cpu_scratch", "--config.model.width=0"],
     "error: config key model.width: 0.0; expected a channel multiplier > 0 (1.0 = the paper's network)"),
    (["--config=configs/cls.py:cpu_scratch", "--config.train.steps=-5"],
     "error: config key train.steps: -5; expected a number of steps >= 0 (0 = cls.epochs over the tiles)"),
    (["--config=configs/pipeline.py:demo", "--config.stage_seg.seg.loss_kind=foo"],
     "error: config key stage_seg.seg.loss_kind: 'foo'; expected one of ce, oeem, c_max, c_diff, "
     "lc_mix, ohem"),
    (["--config=configs/eval.py:cpu", "--config.eval.split_h=-2"],
     "error: config key eval.split_h: -2; expected an integer distance in pixels >= 0 (0 = no "
     "splitting of touching glands)"),
    (["--config=configs/pipeline.py:demo", "--config.data.val_count=-1"],
     "error: config key data.val_count: -1; expected an integer >= 0 (0 = no validation images)"),
    # a pipeline key without its stage prefix
    (["--config=configs/pipeline.py:demo", "--config.train.steps=-5"],
     "error: config key train.steps: '-5', but configs/pipeline.py is a pipeline config and has no "
     "train.steps; expected the stage's prefix: --config.stage_cls.train.steps or "
     "--config.stage_seg.train.steps"),
    # a key no config has, a value of the wrong type
    (["--config=configs/cls.py", "--config.modle.width=2"],
     "error: config key modle.width: '2', but configs/cls.py has no such key; expected a key of that "
     "config (did you mean model.width, model.dtype?)"),
    (["--config=configs/cls.py", "--config.model.width=abc"],
     "error: config key model.width: 'abc'; expected a number (could not convert string to float: 'abc')"),
    # the config file and its argument
    (["--config=configs/nope.py"],
     "error: --config: 'configs/nope.py' is not a file; expected one of configs/cam.py, configs/cls.py, "
     "configs/eval.py, configs/export.py, configs/pipeline.py, configs/predict.py, configs/prepare.py, "
     "configs/seg_ce.py, configs/seg_full.py, configs/seg_oeem.py (optionally with :ARG; --help lists "
     "them)"),
    (["--config=configs/pipeline.py:gpu"],
     "error: --config=configs/pipeline.py:gpu: configs/pipeline.py: unknown argument 'gpu'; expected "
     "nothing, 'cpu', 'cpu_scratch' or 'demo'"),
])
def test_a_bad_command_line_is_one_error_line_and_exit_2(tmp_path, args, line):
  workdir = tmp_path / "w"
  assert _one_error_line(_main(*args, f"--workdir={workdir}")) == line
  assert not workdir.exists()  # refused before anything was written


def test_verbosity_1_adds_the_traceback(tmp_path):
  proc = _main("--config=configs/seg_oeem.py:cpu_scratch", "--config.seg.loss_kind=foo",
               f"--workdir={tmp_path}", "--verbosity=1")
  assert proc.returncode == 2
  assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config key seg.loss_kind: 'foo'")


def test_quiet_log_one_banner_and_where_to_go_next(tmp_path, data_cache, synthetic_splits):
  # prepare on the session's synthetic build (reused): the default log has our lines and
  # warnings only (no TFDS / JAX INFO lines), the SYNTHETIC banner once, and ends by naming the
  # results and the next command.
  proc = _main("--config=configs/prepare.py", f"--config.data.cache_dir={data_cache}",
               f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  err = proc.stderr
  assert err.count("SYNTHETIC DATA") == 1
  for noise in ("dataset_info.py", "reader.py", "logging_logger.py", "xla_bridge.py", "oneDNN"):
    assert noise not in err, noise
  log_lines = [line for line in err.splitlines() if line[:1] in "IWEF" and "]" in line]
  assert all(any(f" {m}.py:" in line for m in ("__init__", "glas", "loader", "source", "splits",
                                               "prepare", "main", "train"))
             for line in log_lines), log_lines
  # the entry point re-executed itself with glibc's huge-page tunable where it applies
  # (oeem_jax/runtime/malloc_env.py), and summary.json records what was in force
  from oeem_jax.runtime import malloc_env
  malloc = json.loads((tmp_path / "prepare" / "summary.json").read_text())["environment"]["malloc"]
  applies = malloc_env.hugetlb_env({k: v for k, v in os.environ.items() if k != "OEEM_MALLOC_REEXEC"},
                                   malloc_env.glibc_version(), malloc_env.thp_mode()) is not None
  assert ("glibc.malloc.hugetlb=1" in malloc["glibc_tunables"]) == (
      applies or "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")), malloc
  last = proc.stdout.strip().splitlines()[-2:]
  assert last == [f"results: {tmp_path / 'prepare'}/ (summary.json)",
                  f"next: python -m oeem_jax.main --config=configs/pipeline.py:demo --workdir={tmp_path}"]


def test_next_steps_after_export_and_seg_name_the_next_command():
  from oeem_jax.main import next_steps
  lines = next_steps({"stage": "export", "model_dir": "/w/export/model"}, "/w", "configs/export.py")
  assert lines == ["results: /w/export/ (summary.json)",
                   "next: python -m oeem_jax.main --config=configs/predict.py --config.predict.model="
                   "/w/export/model --config.predict.inputs='my_images/*.tif' --workdir=OUT"]
  # A pipeline that stopped before eval (pipeline.stages=cls,cam) names no eval results.
  lines = next_steps({"stage": "pipeline", "stages": {"cls": {}, "cam": {}}}, "/w", "configs/pipeline.py:cpu")
  assert lines == ["results: /w/ (each stage's summary.json)",
                   "next: the same command without --config.pipeline.stages runs the remaining stages "
                   "(finished ones are skipped)"]
  assert next_steps({"stage": "pipeline", "stages": {"eval": {"synthetic": True}}}, "/w")[0].startswith(
      "results: /w/eval/metrics.json")
  lines = next_steps({"stage": "seg"}, "/w", "configs/seg_oeem.py:cpu")
  assert lines[-1] == ("next: python -m oeem_jax.main --config=configs/eval.py:cpu --workdir=/w "
                       "--config.data.dir=/path/to/glas")


# ---- no folder left behind, files respect the umask -----------------------------------------------


def test_a_failed_stage_leaves_no_empty_folder(tmp_path):
  cfg = get_base_config("prepare")
  cfg.data.dir = str(tmp_path / "no_such_glas")
  from oeem_jax.errors import GlasDataError
  with pytest.raises(GlasDataError, match="data folder not found"):
    stages.run_stage(cfg, tmp_path / "w")
  assert not (tmp_path / "w").exists()  # neither W/prepare/ nor W itself (this call made both)
  (tmp_path / "kept").mkdir()
  (tmp_path / "kept" / "notes.txt").write_text("mine")
  with pytest.raises(GlasDataError):
    stages.run_stage(cfg, tmp_path / "kept")
  assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]
  # a bad config value: refused before any folder is made
  bad = get_base_config("prepare")
  bad.data.tile_size = 0
  with pytest.raises(errors.ConfigError, match="config key data.tile_size: 0; expected"):
    stages.run_stage(bad, tmp_path / "w2")
  assert not (tmp_path / "w2").exists()


_COUNTING_CONFIG = """
import os
from oeem_jax.config import base as config_base

ARGS = {"": "the demo pipeline, its prepare stage only"}
with open(os.environ["OEEM_COUNT_FILE"], "a") as f:
  f.write("m")  # one letter per execution of this file


def get_config(arg=None):
  with open(os.environ["OEEM_COUNT_FILE"], "a") as f:
    f.write("g")
  c = config_base.load_config_file("pipeline").get_config("demo")
  c.stage_prepare = config_base.load_config_file("prepare").get_config()
  c.pipeline.stages = "prepare"
  return c
"""

# Runs the real entry point with config.check.validate counted (outermost calls only: validating a
# pipeline validates each of its stages inside the same call).
_COUNTING_MAIN = """
import sys
from oeem_jax.config import check
depth, outer = [0], [0]
original = check.validate
def counted(config):
  outer[0] += depth[0] == 0
  depth[0] += 1
  try:
    return original(config)
  finally:
    depth[0] -= 1
check.validate = counted
from oeem_jax import main
try:
  main.run()
finally:
  print("validated", outer[0], file=sys.stderr)
"""


def test_the_config_file_is_executed_once_and_validated_once_per_run(tmp_path, data_cache):
  (tmp_path / "counting.py").write_text(_COUNTING_CONFIG)
  (tmp_path / "run_main.py").write_text(_COUNTING_MAIN)
  count = tmp_path / "count.txt"
  env = dict(os.environ, JAX_PLATFORMS="cpu", OEEM_COUNT_FILE=str(count), OEEM_MALLOC_HUGETLB="0",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, str(tmp_path / "run_main.py"), f"--config={tmp_path}/counting.py",
                         f"--workdir={tmp_path}/w", f"--config.data.cache_dir={data_cache}",
                         "--config.stage_cls.train.steps=7"],  # an override, applied to the one ConfigDict
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert count.read_text() == "mg"  # the file executed once, get_config called once
  assert "validated 1" in proc.stderr.splitlines()[-1]
  summary = json.loads((tmp_path / "w" / "pipeline" / "summary.json").read_text())
  assert summary["config"]["stage_cls"]["train"]["steps"] == 7
  assert list(summary["stages"]) == ["prepare"]


def test_remove_if_empty_keeps_folders_that_hold_a_file(tmp_path):
  (tmp_path / "a" / "b" / "c").mkdir(parents=True)
  assert io_utils.remove_if_empty(tmp_path / "a") and not (tmp_path / "a").exists()
  (tmp_path / "d" / "e").mkdir(parents=True)
  (tmp_path / "d" / "e" / "f.txt").write_text("x")
  assert not io_utils.remove_if_empty(tmp_path / "d") and (tmp_path / "d" / "e" / "f.txt").is_file()
  assert not io_utils.remove_if_empty(tmp_path / "missing")


@pytest.fixture
def umask():
  """Sets the process umask for the test, restores it afterwards."""
  old = os.umask(0o022)
  try:
    yield lambda m: os.umask(m)
  finally:
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask, mode):
  umask(mask)
  assert io_utils.current_umask() == mask
  path = io_utils.atomic_write_json(tmp_path / "s.json", {"a": 1})
  assert (path.stat().st_mode & 0o777) == mode
  assert json.loads(path.read_text()) == {"a": 1}
  import numpy as np
  png = io_utils.atomic_write_png(tmp_path / "p.png", np.zeros((2, 3), np.uint8))
  assert (png.stat().st_mode & 0o777) == mode
  with io_utils.atomic_path(tmp_path / "m.tif") as tmp:  # writers that want a file name (tifffile)
    tmp.write_bytes(b"tiff")
  assert ((tmp_path / "m.tif").stat().st_mode & 0o777) == mode


def test_stage_outputs_are_0644_under_umask_022(tmp_path, umask, data_cache, synthetic_splits):
  umask(0o022)
  cfg = get_base_config("prepare")
  cfg.data.cache_dir = str(data_cache)
  stages.run_stage(cfg, tmp_path)
  assert ((tmp_path / "prepare" / "summary.json").stat().st_mode & 0o777) == 0o644


def test_split_h_is_checked_in_eval_pipeline_and_predict_configs():
  for name, arg, key in (("eval", None, "eval.split_h"), ("predict", None, "predict.split_h"),
                         ("pipeline", "demo", "stage_eval.eval.split_h")):
    c = load_config_file(name).get_config(arg)
    config_check.validate(c)
    section = c.stage_eval.eval if name == "pipeline" else c[name]
    section.split_h = -1
    with pytest.raises(errors.ConfigError, match=f"config key {key}: -1; expected an integer"):
      config_check.validate(c)
  # The paper's eval keeps the plain 8-connected objects; the CPU settings split (docs/evaluation.md).
  assert load_config_file("eval").get_config().eval.split_h == 0
  assert load_config_file("eval").get_config("cpu").eval.split_h == 22
  assert load_config_file("eval").get_config("demo").eval.split_h == 0
  assert load_config_file("predict").get_config().predict.split_h is None  # None = the model's


def test_stitch_keys_are_checked_and_the_cpu_classifier_scores_as_the_cam_stage_stitches():
  c = load_config_file("pipeline").get_config("cpu")
  config_check.validate(c)
  # The classifier's best checkpoint is chosen by the same stitching the cam stage then uses.
  assert c.stage_cls.cls.stitch == c.stage_cam.cam.stitch == "soft"
  assert c.stage_cls.cls.stitch_temperature == c.stage_cam.cam.stitch_temperature == 48.0
  # The paper's settings keep the reference's majority vote.
  assert load_config_file("cam").get_config().cam.stitch == "vote"
  assert load_config_file("cls").get_config().cls.stitch == "vote"
  for key, value, expected in (("stitch", "mean", "one of vote, soft"),
                               ("stitch_temperature", 0.0, "a temperature > 0")):
    bad = load_config_file("cam").get_config("cpu")
    bad.cam[key] = value
    with pytest.raises(errors.ConfigError, match=f"config key cam.{key}: .*expected {expected}"):
      config_check.validate(bad)


def test_the_cpu_pipeline_reads_the_averaged_classifier_and_refuses_an_average_never_written():
  c = load_config_file("pipeline").get_config("cpu")
  config_check.validate(c)
  # cam and the segmenter's backbone read the average of the classifier's 8 checkpoints 100..800.
  assert c.stage_cam.cam.checkpoint == c.stage_seg.seg.backbone_checkpoint == "average"
  assert config_check.averaged_steps(c.stage_cls.checkpoint.every, c.stage_cls.train.steps,
                                     c.stage_cls.checkpoint.average_from) == list(range(100, 900, 100))
  # The paper's settings and the demo keep the best checkpoint.
  for arg in (None, "demo"):
    p = load_config_file("pipeline").get_config(arg)
    assert p.stage_cam.cam.checkpoint == p.stage_seg.seg.backbone_checkpoint == "best"
    assert p.stage_cls.checkpoint.average_from == 0
  c.stage_cls.checkpoint.average_from = 0
  with pytest.raises(errors.ConfigError, match=r"config key stage_cam.cam.checkpoint: 'average'; "
                     r"expected 'best' or 'latest' unless stage_cls.checkpoint.average_from > 0"):
    config_check.validate(c)
  c.stage_cam.cam.checkpoint = "best"
  with pytest.raises(errors.ConfigError, match="config key stage_seg.seg.backbone_checkpoint"):
    config_check.validate(c)
  c.pipeline.stages = "cam,seg"  # the classifier comes from elsewhere: not this pipeline's business
  config_check.validate(c)
  c = load_config_file("pipeline").get_config("cpu")
  c.stage_cls.checkpoint.keep = 7  # 8 checkpoints to average, 7 kept
  with pytest.raises(errors.ConfigError, match="config key stage_cls.checkpoint.average_from: 100"):
    config_check.validate(c)
