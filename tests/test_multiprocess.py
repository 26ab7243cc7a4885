"""Two CPU processes on loopback with `jax.distributed` (oeem_jax.engine.parallel.setup_distributed), launched
the way docs/multihost.md tells users to launch several hosts: the same command in every process,
with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set.

A tiny fully supervised `seg` stage (PSPNet width 1/32, 3 steps of global batch 4 on 64x64 crops of
the synthetic set) runs (a) as 2 processes with 1 CPU device each and (b) as 1 process with 2 CPU
devices. Both run the same SPMD program over a 2-device mesh; they differ in who computes which half
of the batch and in how the two partial sums of every cross-device reduction meet (gloo over TCP vs
in-process). A sum of two float32 partials is the same either way, so the parameters must agree bit
for bit (same `params_digest`). Then a 1-process, 1-device `eval` restores the checkpoint the
2-process run wrote (orbax restores onto the other device count) and must see the same parameters.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # all three processes together (about 2 min on 2 idle cores); each is killed, with its children, past it

SEG = ["--config=configs/seg_full.py:cpu_scratch", "--config.model.width=0.03125",
       "--config.train.steps=3", "--config.train.batch_size=4", "--config.train.log_every=1",
       "--config.train.eval_every=0", "--config.checkpoint.async_save=False",
       "--config.data.val_count=0", "--config.seg.crop_size=64"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
  # Its own session: on failure the whole process group is killed.
  return subprocess.Popen([sys.executable, "-m", "oeem_jax.main", *args], cwd=REPO, env=env,
                          stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache, synthetic_splits):
  tmp = tmp_path_factory.mktemp("multiprocess")
  base = dict(os.environ, JAX_PLATFORMS="cpu",
              PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "OEEM_DISTRIBUTED"):
    base.pop(key, None)
  fast = "--xla_backend_optimization_level=0"  # shorter ResNet-38 compiles; same arithmetic order
  args = SEG + [f"--config.data.cache_dir={data_cache}"]
  port = _free_port()
  procs = {}
  try:
    for i in range(2):
      env = dict(base, XLA_FLAGS=fast, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
      procs[f"p{i}"] = _start(args + [f"--workdir={tmp / 'two'}"], env, tmp / f"p{i}.log")
    env = dict(base, XLA_FLAGS=f"{fast} --xla_force_host_platform_device_count=2")
    procs["one"] = _start(args + [f"--workdir={tmp / 'one'}"], env, tmp / "one.log")
    deadline = time.time() + TIMEOUT_S
    for name, proc in procs.items():
      try:
        proc.wait(timeout=max(deadline - time.time(), 1))
      except subprocess.TimeoutExpired:
        pytest.fail(f"{name} still running after {TIMEOUT_S} s; log:\n"
                    + (tmp / f"{name}.log").read_text()[-3000:])
      assert proc.returncode == 0, f"{name} exit {proc.returncode}:\n" + (tmp / f"{name}.log").read_text()[-3000:]
  finally:
    for proc in procs.values():
      _kill(proc)
  return tmp


def _summary(path: Path) -> dict:
  return json.loads((path / "seg" / "summary.json").read_text())


def test_two_processes_train_the_same_parameters_as_one(runs):
  two, one = _summary(runs / "two"), _summary(runs / "one")
  assert (two["num_processes"], two["num_devices"]) == (2, 2)
  assert (one["num_processes"], one["num_devices"]) == (1, 2)
  assert two["environment"]["devices"] == {"platform": "cpu", "device_kind": "cpu", "local_devices": 1,
                                           "global_devices": 2, "processes": 2}
  assert two["steps"] == one["steps"] == 3
  assert np.isfinite(two["final_train"]["loss"]) and two["first_loss"] == one["first_loss"]
  assert two["params_digest"] == one["params_digest"]
  # Both processes ran the loop (process 1 printed its own final line), process 0 wrote the files.
  for i in range(2):
    assert "seg (true masks, ce): 3 steps" in (runs / f"p{i}.log").read_text()


def test_one_process_eval_restores_the_two_process_checkpoint(runs, data_cache, tmp_path):
  from oeem_jax import stages
  from oeem_jax.config.base import load_config_file
  from oeem_jax.engine.checkpoint import load_variables, params_digest

  two = _summary(runs / "two")
  variables, step = load_variables(runs / "two" / "seg", "latest")  # 2-device save, 1 device here
  assert step == 3 and params_digest(variables["params"]) == two["params_digest"]
  c = load_config_file("eval").get_config("demo")
  c.data.cache_dir = str(data_cache)
  c.eval.seg_dir = str(runs / "two" / "seg")
  c.eval.splits = "test_a"
  c.eval.overlays = False
  summary = stages.run_stage(c, tmp_path)
  assert summary["checkpoint_step"] == 3
  assert summary["checkpoint_params_digest"] == two["params_digest"]
  assert summary["environment"]["devices"]["global_devices"] == 1
  pixel = summary["metrics"]["test_a"]["pixel"]
  assert 0.0 <= pixel["miou"] <= 1.0 and len(list((tmp_path / "eval" / "predictions").glob("*.png"))) == 2
