"""Tests of the training engine (oeem_jax/engine/train.py) on a toy model (tests/train_toy.py).

Subprocesses are used where the process itself is the subject: fake CPU devices (the XLA flag must be
set before JAX is imported) and SIGKILL.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oeem_jax import errors
from oeem_jax.engine import train
from oeem_jax.engine.checkpoint import identity_changes, load_variables, params_digest, run_identity
from oeem_jax.engine.optim import make_optimizer
from oeem_jax.engine.parallel import make_mesh, setup_distributed, shard_batch

HERE = Path(__file__).resolve().parent
TOY_SCRIPT = HERE / "train_toy.py"


def _load_toy():
  spec = importlib.util.spec_from_file_location("train_toy", TOY_SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


toy = _load_toy()
STEPS = 12


class _Child:
  """A toy-script subprocess started in the background (it overlaps with the in-process tests)."""

  def __init__(self, tmp: Path, *args: str, xla_flags: str = ""):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
    self.proc = subprocess.Popen([sys.executable, str(TOY_SCRIPT), *args], cwd=tmp, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def result(self, timeout: float = 300) -> tuple[int, str, str]:
    """(returncode, stdout, stderr); kills the child if it outlives `timeout` seconds."""
    try:
      out, err = self.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      out, err = self.proc.communicate()
    return self.proc.returncode, out, err


@pytest.fixture(scope="module", autouse=True)
def children(tmp_path_factory):
  """Starts both subprocesses when the module starts; tests collect their results.

  * "four": 4 fake CPU devices: the toy run stopped after step 3 (global batch 8, 2 rows per device)
    and the cls/seg overfit runs. XLA's backend optimisation is off there: it shortens the
    ResNet-38 compiles several-fold and only reorders float arithmetic.
  * "killed": the toy run SIGKILLed (by itself) right after step 7.
  """
  tmp = tmp_path_factory.mktemp("children")
  started = {
      "four": _Child(tmp, f"--workdir={tmp / 'w4'}", f"--steps={STEPS}", "--devices=4", "--stop_at=3",
                     "--overfit_stages", f"--out={tmp / 'four.json'}",
                     xla_flags="--xla_backend_optimization_level=0"),
      "killed": _Child(tmp, f"--workdir={tmp / 'killed'}", f"--steps={STEPS}", "--eval_every=4",
                       "--kill_at=7"),
  }
  yield {"tmp": tmp, **started}
  for child in started.values():
    if child.proc.poll() is None:
      child.proc.kill()
      child.proc.wait()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 12-step toy run (checkpoints every 3 steps, all 4 kept; evaluation every 4)."""
  workdir = tmp_path_factory.mktemp("ref")
  result = toy.run(str(workdir), STEPS, eval_every=4, num_devices=1, keep=4)
  return workdir, result


# ---- optimiser --------------------------------------------------------------------------------------


def test_sgd_matches_pytorch_semantics_by_hand():
  # p0 = 1, g(p) = 2p (loss p^2), wd 0.1, momentum 0.9, lr schedule 0.5 -> poly(0.9) over 4 steps.
  # PyTorch SGD: d = g + wd*p; buf = 0.9*buf + d (buf_1 = d); p -= lr_t * buf.
  # step 0: lr 0.5, d = 2 + 0.1 = 2.1, buf = 2.1, p = 1 - 1.05 = -0.05
  # step 1: lr 0.5*(0.75**0.9), d = -0.1 - 0.005 = -0.105, buf = 1.89 - 0.105 = 1.785
  tx, schedule = make_optimizer(0.5, 4, momentum=0.9, weight_decay=0.1)
  p = jnp.array(1.0)
  state = tx.init(p)
  for _ in range(2):
    updates, state = tx.update(2 * p, state, p)
    p = optax.apply_updates(p, updates)
  lr1 = 0.5 * 0.75 ** 0.9
  np.testing.assert_allclose(float(p), -0.05 - lr1 * 1.785, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(1)), lr1, rtol=1e-6)


def test_poly_schedule_with_floor_matches_mmseg_formula():
  # docs/reference.md §4: lr = (5e-3 - 1e-4) * (1 - it / 1e4) ** 0.9 + 1e-4.
  _, schedule = make_optimizer(5e-3, 10_000, end_lr=1e-4)
  for it in (0, 1, 2500, 9999, 10_000, 12_000):
    expected = (5e-3 - 1e-4) * (1 - min(it, 10_000) / 1e4) ** 0.9 + 1e-4
    np.testing.assert_allclose(float(schedule(it)), expected, rtol=1e-5)


def test_trainable_mask_freezes_leaves_completely():
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  tx, _ = make_optimizer(0.1, 10, weight_decay=0.5, trainable_mask={"a": False, "b": True})
  state = tx.init(params)
  grads = {"a": jnp.full(3, 7.0), "b": jnp.full(2, 1.0)}
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_array_equal(np.asarray(updates["a"]), 0.0)  # no gradient, no weight decay
  np.testing.assert_allclose(np.asarray(updates["b"]), -0.1 * (1.0 + 0.5), rtol=1e-6)


def test_make_optimizer_rejects_bad_arguments():
  with pytest.raises(ValueError, match="total_steps"):
    make_optimizer(0.1, 0)


# ---- digest -----------------------------------------------------------------------------------------


def test_params_digest_is_order_independent_and_bit_sensitive():
  a = {"x": np.arange(4, dtype=np.float32), "y": {"k": np.ones((2, 2), np.float32)}}
  b = {"y": {"k": np.ones((2, 2), np.float32)}, "x": np.arange(4, dtype=np.float32)}
  assert params_digest(a) == params_digest(b)
  c = {"x": np.arange(4, dtype=np.float32), "y": {"k": np.ones((2, 2), np.float32)}}
  c["x"][3] = np.nextafter(np.float32(3), np.float32(4))  # one ulp
  assert params_digest(c) != params_digest(a)
  assert len(params_digest(a)) == 64


# ---- the loop ---------------------------------------------------------------------------------------


def test_loop_trains_checkpoints_and_keeps_the_best(reference_run):
  workdir, result = reference_run
  assert result["steps"] == STEPS and result["resumed_from"] is None
  # The toy task is learnt: chance-level BCE is ln 2 = 0.693 (lr 0.3: acc 1.0 at step 12, seeds 0 and 1).
  assert result["final_train"]["loss"] < 0.5 and result["final_eval"]["acc"] >= 0.9
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6, 9, 12]
  # "peak" = -|step - 8| is best at step 8 (evaluations at 4, 8, 12).
  assert [p.name for p in (workdir / "best").iterdir() if p.name.isdigit()] == ["8"]
  assert result["best_eval"]["step"] == 8 and result["best_eval"]["peak"] == 0.0
  assert result["final_eval"] == {"acc": result["final_eval"]["acc"], "peak": -4.0, "step": 12}
  variables, step = load_variables(workdir, "latest")
  assert step == STEPS and params_digest(variables["params"]) == result["params_digest"]
  best, best_step = load_variables(workdir, "best")
  assert best_step == 8 and params_digest(best["params"]) != result["params_digest"]
  assert set(best) == {"params", "batch_stats"} and best["batch_stats"]  # BN statistics are saved


def test_rerun_of_finished_run_changes_nothing(reference_run, tmp_path):
  workdir, result = reference_run
  again = toy.run(str(workdir), STEPS, eval_every=4, num_devices=1)
  assert again["resumed_from"] == STEPS and again["params_digest"] == result["params_digest"]
  # The resumed run knows the best so far (orbax stored its metrics): its evaluation at step 12
  # (peak -4) does not replace the best checkpoint of step 8 (peak 0).
  assert [p.name for p in (workdir / "best").iterdir() if p.name.isdigit()] == ["8"]
  assert again["best_eval"] == result["best_eval"]


def test_checkpoint_average_is_the_mean_of_the_kept_checkpoints(reference_run, tmp_path):
  import shutil

  from oeem_jax.engine import checkpoint
  from oeem_jax.stages._training import write_average

  ref, _ = reference_run
  workdir = tmp_path / "run"
  shutil.copytree(ref, workdir)
  assert checkpoint.periodic_steps(workdir) == [3, 6, 9, 12]
  steps = [6, 9, 12]
  average = checkpoint.average_checkpoints(workdir, steps)
  by_step = [load_variables(workdir, s)[0] for s in steps]
  for coll in ("params", "batch_stats"):
    flat = [jax.tree.leaves(v[coll]) for v in by_step]
    for k, leaf in enumerate(jax.tree.leaves(average[coll])):
      want = (np.float64(flat[0][k]) + np.float64(flat[1][k]) + np.float64(flat[2][k])) / 3
      assert leaf.dtype == flat[0][k].dtype
      np.testing.assert_allclose(leaf, want, rtol=1e-6, atol=1e-7)
  assert params_digest(average["params"]) != params_digest(by_step[-1]["params"])
  with pytest.raises(FileNotFoundError, match=r"step\(s\) \[13\] .*have \[3, 6, 9, 12\].*checkpoint.keep"):
    checkpoint.average_checkpoints(workdir, [9, 12, 13])
  with pytest.raises(FileNotFoundError, match="no averaged checkpoint.*average_from"):
    load_variables(workdir, "average")

  seen = []
  def validator(variables, step):
    seen.append(step)
    return train.EvalResult(metrics={"miou": 0.5})
  out = write_average(workdir, "toy", [6, 9, 12], validator, make_mesh())
  assert out["steps"] == [6, 9, 12] and out["eval"] == {"miou": 0.5} and seen == [12]
  restored, step = load_variables(workdir, "average")
  assert step == 12 and params_digest(restored["params"]) == out["params_digest"]
  assert params_digest(restored["params"]) == params_digest(average["params"])
  # The periodic and best checkpoints are untouched.
  assert load_variables(workdir, "best")[1] == 8 and load_variables(workdir, "latest")[1] == 12


def test_average_from_is_checked_against_the_kept_checkpoints():
  import ml_collections

  from oeem_jax.config.check import STAGE_RULES, averaged_steps, check_rules

  assert averaged_steps(100, 800, 400) == [400, 500, 600, 700, 800]
  assert averaged_steps(300, 800, 500) == [600, 800]  # the last step is always saved
  assert averaged_steps(0, 800, 1) == [800]
  cfg = ml_collections.ConfigDict({"train": {"steps": 800}, "checkpoint": {
      "every": 100, "keep": 5, "average_from": 400}})
  rules = [r for r in STAGE_RULES["cls"] if r[0] == "checkpoint.average_from"]
  check_rules(cfg, rules)  # five checkpoints, five kept
  cfg.checkpoint.keep = 4
  with pytest.raises(errors.ConfigError, match="checkpoint.average_from.*checkpoint.keep holds"):
    check_rules(cfg, rules)
  cfg.checkpoint.update(keep=8, average_from=900)
  with pytest.raises(errors.ConfigError, match="checkpoint.average_from"):
    check_rules(cfg, rules)


@pytest.fixture(scope="module")
def four_devices(children):
  code, _, err = children["four"].result()
  assert code == 0, err[-3000:]
  return json.loads((children["tmp"] / "four.json").read_text())


@pytest.mark.parametrize("stage", ["cls", "seg"])
def test_stage_models_overfit_a_fixed_batch(four_devices, stage):
  # The real CAMClassifier / PSPNet with the stages' loss functions, data-parallel on 4 devices.
  r = four_devices["stages"][stage]
  assert r["num_devices"] == 4
  # cls starts near chance BCE (ln 2 = 0.69), seg near 1.4 * ln 2 = 0.97 (decode + 0.4 aux).
  assert r["final_train"]["loss"] < 0.4 * r["first_loss"], r


def test_resume_of_a_different_run_is_refused(reference_run):
  # A ConfigError: `python -m oeem_jax.main` prints it as one `error: config key ...` line, exit 2.
  from oeem_jax.errors import ConfigError
  workdir, _ = reference_run
  with pytest.raises(ConfigError) as info:
    toy.run(str(workdir), STEPS, eval_every=4, num_devices=1, identity={"train": {"lr": 0.2}})
  assert str(info.value) == (
      f"config key train: {{'lr': 0.2}}; expected no value, as in the run whose step {STEPS} is in "
      f"{workdir / 'checkpoints'}; for another run use a new --workdir (or delete that folder)")
  # Several keys: the first one is named with its old value, the others are counted.
  changes = identity_changes({"train": {"lr": 0.1, "steps": 8}, "seed": 0},
                                   {"train": {"lr": 0.1, "steps": 16}, "seed": 1})
  assert changes == [("seed", 0, 1), ("train.steps", 8, 16)]


def test_a_restart_from_scratch_is_logged(tmp_path, caplog):
  # An attempt killed before its first checkpoint (the demo saves only at the end) left TensorBoard
  # events; the next attempt says that it starts again from step 0.
  (tmp_path / "tensorboard").mkdir()
  (tmp_path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
  with caplog.at_level("INFO"):
    result = toy.run(str(tmp_path), 2, num_devices=1, every=0)
  assert result["resumed_from"] is None
  lines = [r.getMessage() for r in caplog.records if "step 0" in r.getMessage()]
  assert lines == [f"toy: {tmp_path / 'checkpoints'} holds no checkpoint (an earlier attempt left "
                   "tensorboard; with checkpoint_every 0 it saved only at the end): training restarts "
                   "from step 0"], lines
  caplog.clear()
  with caplog.at_level("INFO"):
    toy.run(str(tmp_path / "fresh"), 2, num_devices=1, every=0)
  assert [r.getMessage() for r in caplog.records if "step 0" in r.getMessage()] == [
      f"toy: no checkpoint in {tmp_path / 'fresh' / 'checkpoints'}: starting from step 0"]


def test_run_identity_ignores_logging_and_eval_keys():
  import ml_collections
  c = ml_collections.ConfigDict({"stage": "seg", "seed": 1, "train": {"lr": 0.1, "log_every": 5,
                                 "eval_every": 9, "distributed": "auto"},
                                 "data": {"dir": "x/../glas", "cache_dir": "/c"},
                                 "seg": {"loss_kind": "oeem", "eval_window": 320}})
  ident = run_identity(c, ("seg", "data"))
  assert ident == {"stage": "seg", "seed": 1, "train": {"lr": 0.1}, "seg": {"loss_kind": "oeem"},
                   "data": {"dir": str(Path("glas").resolve())}}


def test_one_vs_four_devices_agree(reference_run, four_devices, children):
  # Same 12-step schedule and global batch 8 on 4 fake CPU devices (2 rows each), stopped after step 3;
  # compared with the 1-device reference run's step-3 checkpoint. BN statistics are over the global
  # batch in both, and the dropout masks do not depend on the sharding.
  four = four_devices
  assert four["num_devices"] == 4 and four["stopped_at"] == 3 and four["checkpoint_step"] == 3
  workdir, _ = reference_run
  one, step = load_variables(workdir, 3)
  assert step == 3
  # The 4-device checkpoint restores here, on 1 device (orbax needs the target's shapes for that).
  saved, saved_step = load_variables(children["tmp"] / "w4", "latest")
  assert saved_step == 3
  np.testing.assert_array_equal(np.concatenate([np.ravel(x) for x in jax.tree.leaves(saved["params"])]),
                                np.concatenate([np.ravel(x) for x in four["flat_params"]]).astype(np.float32))
  init = jax.jit(lambda key: toy.make_model().init({"params": jax.random.split(key)[0]},
                                                  jnp.zeros((1, 8, 8, 3)), train=False))(
                                                      jax.random.PRNGKey(0))["params"]
  moved = []
  for a, b, c in zip(jax.tree.leaves(one["params"]), four["flat_params"], jax.tree.leaves(init)):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)
    moved.append(np.abs(a - np.asarray(c, np.float64).ravel()).max())
  assert max(moved) > 1e-3  # the parameters did move: not a comparison of two initialisations


def test_sigkill_then_resume_is_bit_identical(reference_run, children):
  _, ref = reference_run
  workdir = children["tmp"] / "killed"
  code, out, err = children["killed"].result()
  assert code == -signal.SIGKILL, err[-3000:]
  assert "STEP 7" in out and "STEP 8" not in out
  resumed = toy.run(str(workdir), STEPS, eval_every=4, num_devices=1)
  assert resumed["resumed_from"] in (3, 6)  # 6 unless the kill landed during its async write
  assert resumed["params_digest"] == ref["params_digest"]
  assert resumed["best_eval"]["step"] == 8


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(errors.NonFiniteLossError, match=r"non-finite loss at step 7\b.*Last good checkpoint: step 6"):
    toy.run(str(tmp_path), STEPS, nan_at=7, num_devices=1)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3, 6]
  variables, step = load_variables(tmp_path, "latest")
  assert step == 6
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_sigterm_saves_then_exits_and_resumes_exactly(reference_run, tmp_path):
  _, ref = reference_run
  with pytest.raises(train.Preempted) as info:
    toy.run(str(tmp_path), STEPS, sigterm_at=5, eval_every=4, num_devices=1)
  # The signal arrives after step 5; the loop notices it at the next step boundary.
  assert info.value.step == 6 and info.value.code == 143
  assert load_variables(tmp_path, "latest")[1] == 6
  resumed = toy.run(str(tmp_path), STEPS, eval_every=4, num_devices=1)
  assert resumed["resumed_from"] == 6 and resumed["params_digest"] == ref["params_digest"]
  # keep=2: only the two newest periodic checkpoints remain.
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [9, 12]


def test_pretrained_hook_and_frozen_leaves(tmp_path):
  # The hook replaces the fresh initialisation (host arrays in, host arrays out); a False leaf of the
  # trainable mask keeps its value exactly while the others train.
  def pretrained(variables):
    params = jax.tree.map(lambda x: np.full_like(x, 0.5), variables["params"])
    return {"params": params, "batch_stats": variables["batch_stats"]}

  params_shape = jax.eval_shape(
      lambda: toy.make_model().init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 8, 8, 3)),
                                    train=False))["params"]
  mask = jax.tree_util.tree_map_with_path(lambda path, _: "Conv_0" not in jax.tree_util.keystr(path),
                                          params_shape)
  toy.run(str(tmp_path), 3, every=0, num_devices=1, pretrained=pretrained, trainable_mask=mask)
  variables, _ = load_variables(tmp_path, "latest")
  np.testing.assert_array_equal(variables["params"]["Conv_0"]["kernel"], 0.5)
  dense = variables["params"]["Dense_0"]["kernel"]
  assert np.abs(dense - 0.5).max() > 1e-4 and np.abs(dense - 0.5).max() < 0.5


def test_batch_not_divisible_by_devices_is_a_clear_error():
  mesh = make_mesh(jax.devices()[:1])
  assert shard_batch({"x": np.zeros((3, 2))}, mesh)["x"].shape == (3, 2)
  with pytest.raises(ValueError, match=r"config key train.batch_size: 3; expected a multiple of the 2 devices"):
    fake = type("M", (), {"size": 2})()  # only .size is consulted before the error
    shard_batch({"x": np.zeros((3, 2))}, fake)


def test_padded_batches_and_batched_apply():
  from oeem_jax.engine import parallel
  a, b = np.arange(10, dtype=np.float32).reshape(5, 2), np.arange(5, dtype=np.uint8)
  got = list(parallel.padded_batches((a, b), 2))
  assert [k for k, _ in got] == [2, 2, 1]
  assert all(x.shape == (2, 2) and x.dtype == np.float32 and y.shape == (2,) and y.dtype == np.uint8
             for _, (x, y) in got)
  np.testing.assert_array_equal(got[-1][1][0], [[8, 9], [0, 0]])  # the last batch is zero-padded
  assert list(parallel.padded_batches((a[:0],), 2)) == []
  mesh = make_mesh(jax.devices()[:1])
  fake = type("M", (), {"size": 4})()
  assert parallel.round_to_mesh(3, fake) == 4 and parallel.round_to_mesh(8, fake) == 8
  apply = parallel.BatchedApply(lambda v, x, y: (x * v, y + 1), mesh, 2)
  x, y = apply.map(jnp.float32(3.0), a, b)
  np.testing.assert_array_equal(x, 3 * a)
  np.testing.assert_array_equal(y, b + 1)


def test_loop_options_from_config_and_schedule_of_a_step():
  import ml_collections
  c = ml_collections.ConfigDict({"seed": 3, "checkpoint": {"every": 4, "keep": 1, "async_save": False},
                                 "train": {"log_every": 5, "eval_every": 6}})
  o = train.LoopOptions.from_config(c, 12, name="x", best_metric="m")
  assert o == train.LoopOptions(total_steps=12, seed=3, checkpoint_every=4, keep=1, log_every=5,
                                eval_every=6, best_metric="m", async_checkpoint=False, name="x")
  # (log, evaluate, save) after a step: the last step does everything, a preemption saves.
  assert o.due(4, False, True) == (False, False, True)
  assert o.due(6, False, True) == (False, True, False) and o.due(6, False, False) == (False,) * 3
  assert o.due(7, True, True) == (False, False, True)
  assert o.due(12, False, True) == (True, True, True)
  with pytest.raises(ValueError, match="total_steps must be > 0"):
    train.LoopOptions(total_steps=0, seed=0, checkpoint_every=0).validate()
  with pytest.raises(ValueError, match="best_mode"):
    train.LoopOptions(total_steps=1, seed=0, checkpoint_every=0, best_mode="up").validate()


def test_setup_distributed_modes(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.delenv("OEEM_DISTRIBUTED", raising=False)
  assert setup_distributed("auto") is False  # nothing asks for it: stays single-process
  assert setup_distributed(False) is False
  with pytest.raises(ValueError, match="train.distributed"):
    setup_distributed("maybe")


# ---- stage helpers ----------------------------------------------------------------------------------


def test_seg_reads_pseudo_masks_and_rejects_bad_ones(tmp_path):
  import ml_collections

  from oeem_jax.runtime import artifacts, io_utils
  from oeem_jax.stages import seg as seg_stage

  mask = np.zeros((5, 7), np.uint8)
  mask[1:3, 2:6] = 1
  mask[4, 0] = 255
  io_utils.atomic_write_png(tmp_path / "cam" / "pseudo_masks" / "train_1.png", mask,
                            palette=[0, 0, 0, 255, 255, 255] + [128] * (254 * 3))
  ex = type("Ex", (), {"name": "train_1", "image": np.zeros((5, 7, 3), np.uint8),
                       "mask": np.zeros((5, 7), np.uint8)})()
  cfg = ml_collections.ConfigDict({"seg": {"mask_source": "pseudo", "pseudo_dir": ""}})
  got = seg_stage.training_masks(cfg, tmp_path / "seg", [ex])  # default: WORKDIR/cam/pseudo_masks
  np.testing.assert_array_equal(got[0], mask)

  ex.mask = np.full((5, 7), 3, np.uint8)  # instance id 3 -> gland
  cfg.seg.mask_source = "true"
  np.testing.assert_array_equal(seg_stage.training_masks(cfg, tmp_path / "seg", [ex])[0], 1)

  cfg.seg.mask_source = "pseudo"
  ex.name = "train_2"
  with pytest.raises(FileNotFoundError, match="run stage cam first"):
    seg_stage.training_masks(cfg, tmp_path / "seg", [ex])
  io_utils.atomic_write_png(tmp_path / "cam" / "pseudo_masks" / "train_2.png", mask * 2)
  with pytest.raises(ValueError, match="holds values \\[2, 254\\]"):
    seg_stage.training_masks(cfg, tmp_path / "seg", [ex])
  ex.image = np.zeros((6, 7, 3), np.uint8)
  with pytest.raises(ValueError, match="7x5 \\(WxH\\), the image is 7x6"):
    artifacts.read_pseudo_mask(tmp_path / "cam" / "pseudo_masks" / "train_1.png", (6, 7))
  # Another source is refused by the config check before the stage runs (not again by the stage).
  from oeem_jax.config import check as config_check
  from oeem_jax.config.base import load_config_file
  c = load_config_file("seg_oeem").get_config("cpu")
  c.seg.mask_source = "both"
  with pytest.raises(errors.ConfigError, match="config key seg.mask_source: 'both'; expected one of pseudo, true"):
    config_check.validate(c)


def test_segmenter_backbone_from_the_classifier(tmp_path, monkeypatch):
  import ml_collections

  from oeem_jax.models import CAMClassifier, PSPNet, init_variables
  from oeem_jax.stages import seg as seg_stage

  tiny = 1 / 32
  cls_vars = jax.device_get(init_variables(CAMClassifier(width=tiny), jax.random.PRNGKey(1),
                                           (1, 16, 16, 3)))
  seg_vars = jax.device_get(init_variables(PSPNet(width=tiny), jax.random.PRNGKey(2),
                                           (1, 16, 16, 3)))
  out = seg_stage.copy_backbone(seg_vars, cls_vars, "cls")
  for coll in ("params", "batch_stats"):
    for a, b in zip(jax.tree.leaves(out[coll]["backbone"]), jax.tree.leaves(cls_vars[coll]["backbone"])):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(out[coll]["decode"]), jax.tree.leaves(seg_vars[coll]["decode"])):
      np.testing.assert_array_equal(a, b)  # heads keep their own initialisation
  k = seg_vars["params"]["backbone"]["conv1a"]["kernel"]
  assert not np.array_equal(k, out["params"]["backbone"]["conv1a"]["kernel"])  # something changed
  wider = jax.device_get(init_variables(CAMClassifier(width=2 * tiny), jax.random.PRNGKey(1),
                                        (1, 16, 16, 3)))
  with pytest.raises(ValueError, match="params/backbone.*model.width"):
    seg_stage.copy_backbone(seg_vars, wider, "cls")

  cfg = ml_collections.ConfigDict({"model": {"init_checkpoint": ""},
                                   "seg": {"backbone_init": ""}})
  assert seg_stage.init_hook(cfg, tmp_path / "seg") is None
  cfg.seg.backbone_init = "cls"
  with pytest.raises(FileNotFoundError, match="no classifier checkpoint in .*cls.*backbone_init=''"):
    seg_stage.init_hook(cfg, tmp_path / "seg")
  (tmp_path / "cls" / "best").mkdir(parents=True)
  monkeypatch.setattr(seg_stage, "load_variables", lambda d, which: (cls_vars, 7))
  hook = seg_stage.init_hook(cfg, tmp_path / "seg")
  got = hook(seg_vars)
  np.testing.assert_array_equal(got["params"]["backbone"]["conv1a"]["kernel"],
                                cls_vars["params"]["backbone"]["conv1a"]["kernel"])
  (tmp_path / "res38d.pth").write_bytes(b"")
  cfg.model.init_checkpoint = str(tmp_path / "res38d.pth")
  with pytest.raises(ValueError, match="both set"):
    seg_stage.init_hook(cfg, tmp_path / "seg")


def test_configs_have_the_shared_keys_and_cpu_variants():
  import importlib.util as iu

  root = HERE.parent / "configs"
  for name, stage in (("cls", "cls"), ("seg_oeem", "seg"), ("seg_ce", "seg"), ("seg_full", "seg")):
    spec = iu.spec_from_file_location(f"cfg_{name}", root / f"{name}.py")
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    paper, cpu = module.get_config(), module.get_config("cpu")
    assert paper.stage == stage == cpu.stage
    for c in (paper, cpu):
      for key in ("data.dir", "model.width", "train.steps", "train.batch_size", "train.lr",
                  "checkpoint.every", "checkpoint.keep", "seed"):
        node = c
        for part in key.split("."):
          node = node[part]
    assert paper.model.width == 1.0 and cpu.model.width <= 0.25
    with pytest.raises(ValueError, match="unknown argument"):
      module.get_config("gpu")
  spec = iu.spec_from_file_location("cfg_seg_full", root / "seg_full.py")
  full = iu.module_from_spec(spec)
  spec.loader.exec_module(full)
  assert full.get_config().seg.mask_source == "true"
