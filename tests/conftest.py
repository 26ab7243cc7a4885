"""Shared pytest fixtures.

* `glas_dir`: the real GlaS folder (`launch/dev_paths.py`'s `default_glas_dir()`, i.e. `$OEEM_GLAS_DIR` or
  `<repo>/../shared/data/glas`); tests that use it are skipped with a clear reason when it is absent.
* `glas_splits`: the real GlaS loaded once per test session (`load_splits`, default validation
  carve-out) into a session temp cache: one TFDS build per session.
* `synthetic_splits`: the embedded synthetic set (default 12 + 4 images), once per session.
* `demo_pipeline`: the README's main command (`configs/pipeline.py:demo`) and its log (stderr): the
  run `.ci/run` made before the tests when `$OEEM_DEMO_WORKDIR` names it, else one run of the command
  in a subprocess started when the session starts (only when a selected test needs it), so that it
  overlaps the other tests (they leave most of the second core idle).

`launch/` is put on sys.path: the development-only modules there (`hlo_census`, `torch_reference`)
are tested, and used by the benchmark scripts beside them, without being part of the package.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_collections
import pytest

from oeem_jax.config.base import get_base_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from dev_paths import default_glas_dir  # noqa: E402  (launch/ is on sys.path from here)


@pytest.fixture(scope="session")
def glas_dir() -> Path:
  d = default_glas_dir()
  if not (d / "Grade.csv").is_file():
    pytest.skip(f"real GlaS data not found at {d} (set OEEM_GLAS_DIR or place the Warwick-QU folder at "
                "../shared/data/glas relative to the repo)")
  return d


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("oeem_cache")


def _data_config(**kw) -> ml_collections.ConfigDict:
  cfg = get_base_config("prepare").data
  for k, v in kw.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope="session")
def glas_splits(glas_dir, data_cache):
  from oeem_jax.data import loader
  return loader.load_splits(_data_config(dir=str(glas_dir), cache_dir=str(data_cache)))


@pytest.fixture(scope="session")
def synthetic_splits(data_cache):
  from oeem_jax.data import loader
  return loader.load_splits(_data_config(dir="", cache_dir=str(data_cache)))




REPO = Path(__file__).resolve().parents[1]
# The demo's stderr (its log) beside its workdir; .ci/run writes it there too.
DEMO_LOG_NAME = "demo_stderr.log"
_DEMO: dict = {}  # the background demo of this session: {"proc", "workdir", "log"}


def _start_demo() -> None:
  root = Path(tempfile.mkdtemp(prefix="oeem-test-demo-"))
  workdir, log = root / "demo", root / DEMO_LOG_NAME
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  with open(log, "w") as err:
    proc = subprocess.Popen([sys.executable, "-m", "oeem_jax.main", "--config=configs/pipeline.py:demo",
                             f"--workdir={workdir}", f"--config.data.cache_dir={root / 'cache'}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
  _DEMO.update(proc=proc, workdir=workdir, log=log, root=root)


def pytest_collection_modifyitems(session, config, items):
  """The tests that need the demo run last (stable order otherwise): the demo, started in the
  background when collection finishes, runs while the others do."""
  items.sort(key=lambda item: "demo_pipeline" in getattr(item, "fixturenames", ()))


def pytest_collection_finish(session):
  """Starts the README's main command in the background when a selected test uses `demo_pipeline`
  and `.ci/run` has not run it already ($OEEM_DEMO_WORKDIR)."""
  if session.config.option.collectonly:
    return
  if not os.environ.get("OEEM_DEMO_WORKDIR") and any(
      "demo_pipeline" in getattr(item, "fixturenames", ()) for item in session.items):
    _start_demo()


def pytest_sessionfinish(session, exitstatus):
  """Stops the background demo if the session ended before it needed it, and removes its folder."""
  import shutil

  proc = _DEMO.get("proc")
  if proc is not None and proc.poll() is None:
    proc.kill()
    proc.wait()
  if "root" in _DEMO:
    shutil.rmtree(_DEMO["root"], ignore_errors=True)


@pytest.fixture(scope="session")
def demo_pipeline():
  """(workdir, stderr log text or None) of `configs/pipeline.py:demo`, the README's main command.

  `$OEEM_DEMO_WORKDIR` (set by `.ci/run`, which runs that command first): its workdir and the log
  `.ci/run` saved beside it as `demo_stderr.log` (None where there is none). Otherwise the run this session started in
  the background (`pytest_collection_finish`); waits for it (a few minutes on 2 cores).
  """
  given = os.environ.get("OEEM_DEMO_WORKDIR")
  if given:
    log = Path(given).parent / DEMO_LOG_NAME
    return Path(given), (log.read_text() if log.is_file() else None)
  if "proc" not in _DEMO:  # not foreseen at collection: start it now
    _start_demo()
  proc = _DEMO["proc"]
  rc = proc.wait(timeout=1800)
  text = _DEMO["log"].read_text()
  assert rc == 0, f"the demo pipeline failed (exit {rc}):\n{text[-3000:]}"
  return _DEMO["workdir"], text


def log_messages(text: str) -> list[str]:
  """The messages of the absl log in `text` (stderr of `python -m oeem_jax.main`): each starts at a
  line `I1207 22:46:24.229183 1402 file.py:67] first line` and runs to the next such line."""
  import re

  prefix = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [^\]]+\] ")
  messages: list[str] = []
  for line in text.splitlines():
    m = prefix.match(line)
    if m:
      messages.append(line[m.end():])
    elif messages:
      messages[-1] += "\n" + line
  return messages


def capture_absl_log(fn):
  """Runs `fn()` with absl's INFO records collected; returns (fn's result, the LogRecords)."""
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logger = logging.getLogger("absl")
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    return fn(), records
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
