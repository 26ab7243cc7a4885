"""Generic data-parallel training loop shared by the `cls` and `seg` stages.

The loop knows nothing about models or data. A stage hands it a `Task`:

* `init_variables(rng) -> {"params": ..., "batch_stats": ...}` (traced under `jax.jit`), and
  optionally a host-side `pretrained(variables) -> variables` hook (e.g. imported ImageNet weights);
* `loss_fn(params, batch_stats, batch, rng) -> (loss, (new_batch_stats, metrics))`, traced under
  `jax.jit` with the *global* batch (so BatchNorm statistics are over the global batch: synchronised
  BN for free);
* `make_iterator(start_step)` yielding this process's slice of batch `start_step`, `start_step + 1`, ...
  as dicts of NumPy arrays (the data pipelines are a pure function of (seed, step), which makes resume
  exact);
* optionally `eval_fn(variables, step) -> EvalResult` run every `eval_every` steps and at the end;

and `LoopOptions` (steps, seed, checkpoint / log / evaluation periods, best metric).

The pieces live in their own modules: `oeem_jax.engine.parallel` (distributed set-up, the 1-D "data" mesh,
replicating and sharding: the batch is sharded along its leading axis, the train state is
replicated, the jitted step donates the state), `oeem_jax.engine.optim` (SGD + poly schedule, frozen
parameters) and `oeem_jax.engine.checkpoint` (orbax managers, run identity, digests, `load_variables`).
Import their names from them; loading a checkpoint needs only `checkpoint.load_variables`.

Checkpoints (`oeem_jax.engine.checkpoint`): `<stage_dir>/checkpoints/<step>/` holds the whole `TrainState`
plus a JSON `meta` item; saved every `checkpoint_every` steps, at the end, and when SIGTERM arrives;
the newest `keep` are kept. A run started in a `stage_dir` that holds one resumes from the newest;
a resume whose `run_identity` differs is refused. `<stage_dir>/best/<step>/` holds the variables of
the best evaluation so far by `best_metric` (saved only when the metric strictly improves).

Exactness: the dropout RNG of step `s` is `fold_in(state.rng, s)` and batch `s` comes from
`make_iterator(s)`, so a run killed at any point and restarted from its newest checkpoint replays
the same updates; on CPU the final parameters are bit-identical to an uninterrupted run
(tests/test_train.py checks `params_digest`).

Failure handling: a non-finite loss or gradient norm raises `NonFiniteLossError` naming the step;
a state is saved only after its step's loss and gradient norm were checked finite, so the newest
checkpoint on disk is always a good one. SIGTERM (single process) or a JAX preemption sync point
(multi-process) saves a checkpoint at the next step boundary and raises `Preempted` (a `SystemExit`
with code 143). Any other exception still lets checkpoint writes under way finish.

Progress lines and TensorBoard scalars (clu `metric_writers`, process 0) are written every
`log_every` steps; steps/s and the ETA count training time only (evaluations are left out).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from oeem_jax.engine.checkpoint import Checkpoints, params_digest, quiet_orbax_logs
from oeem_jax.engine.parallel import make_mesh, replicate, shard_batch
from oeem_jax.errors import NonFiniteLossError

__all__ = ["EvalResult", "LoopOptions", "Preempted", "Task", "TrainState", "make_step_fn", "train_loop"]

PyTree = Any
Batch = Mapping[str, np.ndarray]
LossFn = Callable[[PyTree, PyTree, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, tuple[PyTree, Mapping[str, jax.Array]]]]

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class Preempted(SystemExit):
  """SIGTERM / preemption: a checkpoint was saved at `step`; exits with code 143 when uncaught."""

  def __init__(self, step: int):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.step = step


@flax.struct.dataclass
class TrainState:
  """Everything that defines a training run at a step boundary.

  Attributes:
    params: model parameters (pytree of float32 arrays).
    batch_stats: BatchNorm running statistics (pytree; `{}` for models without BN).
    opt_state: optax state for `params`.
    step: int32 scalar, number of optimiser updates applied so far.
    rng: uint32[2] raw PRNG key; step `s` uses `fold_in(rng, s)` (dropout etc.).
  """
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  step: jax.Array
  rng: jax.Array

  @property
  def variables(self) -> dict[str, PyTree]:
    """`{"params", "batch_stats"}` as flax `apply` expects them."""
    return {"params": self.params, "batch_stats": self.batch_stats}


@dataclasses.dataclass
class EvalResult:
  """What an evaluation returns: scalar metrics (floats) and optional images for TensorBoard.

  `images` maps a name to uint8[N, H, W, 3] (or [N, H, W, 1]) arrays.
  """
  metrics: dict[str, float]
  images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Task:
  """What a stage trains (module docstring).

  Attributes:
    init_variables: rng (uint32[2]) -> {"params": ..., "batch_stats": ...} (batch_stats may be
      absent); traced under `jax.jit` (random initialisation only); when resuming it is only traced
      for shapes.
    loss_fn: (params, batch_stats, batch, rng) -> (scalar loss, (new batch_stats, dict of scalar
      metrics)); `batch` holds global arrays (this process's rows from `make_iterator`, sharded).
    make_iterator: start_step -> iterator over this process's rows of batches start_step, ... (dicts
      of NumPy arrays with a leading batch axis); must be a pure function of the step for exact
      resume.
    tx: the optimiser (`make_optimizer`).
    schedule: its learning-rate schedule (only for the logs), or None.
    pretrained: optional host-side hook applied to the fresh variables (NumPy) of a run that does
      not resume, e.g. to load imported ImageNet weights; returns variables of the same structure.
    eval_fn: (variables, step) -> EvalResult, or None; run every `eval_every` steps and after the
      last step. It runs on every process (same values everywhere); only process 0 writes files.
  """
  init_variables: Callable[[jax.Array], Mapping[str, PyTree]]
  loss_fn: LossFn
  make_iterator: Callable[[int], Iterator[Batch]]
  tx: optax.GradientTransformation
  schedule: optax.Schedule | None = None
  pretrained: Callable[[Mapping[str, PyTree]], Mapping[str, PyTree]] | None = None
  eval_fn: Callable[[Mapping[str, PyTree], int], EvalResult] | None = None


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  """How `train_loop` runs a task.

  Attributes:
    total_steps: number of updates of the whole run (resumed runs continue to it; > 0).
    seed: seeds `init_variables` and the per-step RNG.
    checkpoint_every: save every this many steps (and at the end); <= 0 saves only at the end.
    keep: number of periodic checkpoints kept.
    log_every: a progress line and TensorBoard scalars every this many steps.
    eval_every: evaluate every this many steps (<= 0: only after the last step).
    best_metric: key of `EvalResult.metrics` deciding the best checkpoint (None: no best/ kept).
    best_mode: "max" or "min".
    async_checkpoint: orbax async saving (training continues while the files are written).
    tensorboard: write TensorBoard events under stage_dir/tensorboard (process 0).
    name: label of the log lines.
  """
  total_steps: int
  seed: int
  checkpoint_every: int
  keep: int = 2
  log_every: int = 50
  eval_every: int = 0
  best_metric: str | None = None
  best_mode: str = "max"
  async_checkpoint: bool = True
  tensorboard: bool = True
  name: str = "train"

  @classmethod
  def from_config(cls, config, total_steps: int, **fields: Any) -> LoopOptions:
    """The options a stage config fixes (keys seed, checkpoint.every / keep / async_save,
    train.log_every / eval_every), plus `total_steps` and any other `fields` (e.g. name)."""
    return cls(total_steps=int(total_steps), seed=int(config.seed),
               checkpoint_every=int(config.checkpoint.every), keep=int(config.checkpoint.keep),
               log_every=int(config.train.log_every), eval_every=int(config.train.eval_every),
               async_checkpoint=bool(config.checkpoint.async_save), **fields)

  def validate(self) -> None:
    """Raises ValueError for a non-positive `total_steps` or an unknown `best_mode`."""
    if self.total_steps <= 0:
      raise ValueError(f"{self.name}: total_steps must be > 0, got {self.total_steps}")
    if self.best_mode not in ("max", "min"):
      raise ValueError(f"{self.name}: best_mode must be 'max' or 'min', got {self.best_mode!r}")

  def due(self, step: int, preempt: bool, evaluates: bool) -> tuple[bool, bool, bool]:
    """(log, evaluate, save) after update `step` (1-based)."""
    last = step == self.total_steps
    do_log = step % self.log_every == 0 or last
    do_eval = evaluates and (last or (self.eval_every > 0 and step % self.eval_every == 0))
    do_save = last or preempt or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0)
    return do_log, do_eval, do_save


# ---------------------------------------------------------------------------------------------------
# The step


def make_step_fn(loss_fn: LossFn, tx: optax.GradientTransformation,
                 schedule: optax.Schedule | None = None
                 ) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """The training step `train_loop` jits: (state, batch) -> (state after one update, metrics).

  Dropout RNG of step s = `fold_in(state.rng, s)`; gradients of `loss_fn` with respect to
  `state.params`, one `tx` update, `state.step + 1`. Metrics: `loss_fn`'s, plus "loss",
  "grad_norm" (global L2 norm of the gradients) and, with a schedule, "lr" (the learning rate of
  this update), each reduced to a float32 scalar. Not jitted here: `train_loop` jits it with the
  state donated; launch/accelerator_check.py compiles the same function to time it.
  """
  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    def objective(p):
      return loss_fn(p, state.batch_stats, batch, rng)
    (loss, (new_bs, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    gnorm = optax.tree.norm(grads)
    metrics = {**metrics, "loss": loss, "grad_norm": gnorm}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    metrics = jax.tree.map(lambda m: jnp.mean(m).astype(jnp.float32), metrics)
    return state.replace(params=new_params, batch_stats=new_bs, opt_state=opt_state,
                         step=state.step + 1), metrics

  return step_fn


# ---------------------------------------------------------------------------------------------------
# Pieces of the loop


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _NullWriter:
  """Stands in for a clu MetricWriter when nothing is written (tests, processes other than 0)."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_images(self, step, images):
    del step, images

  def flush(self):
    pass

  def close(self):
    pass


def _make_writer(stage_dir: Path, tensorboard: bool):
  """clu's async TensorBoard writer under stage_dir/tensorboard (process 0), else a null writer."""
  if not (tensorboard and jax.process_index() == 0):
    return _NullWriter()
  from clu import metric_writers  # imports TensorFlow: only when asked
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(stage_dir / "tensorboard")))


class _SigtermFlag:
  """Installs a SIGTERM handler (main thread of a single-process run) that only sets a flag."""

  def __init__(self):
    self.fired = False
    self._previous = None

  def __enter__(self):
    import threading
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.fired = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Progress:
  """Checks each step's metrics, averages them over the log window, writes the progress lines."""

  def __init__(self, options: LoopOptions, writer, ckpts: Checkpoints):
    self.options, self.writer, self.ckpts = options, writer, ckpts
    self.window: dict[str, float] = {}
    self.window_n = 0
    self.last_lr = float("nan")
    self.first_loss: float | None = None
    self.final_train: dict[str, float] = {}
    self.t_window = time.time()
    self.steps_window = 0

  def record(self, step_index: int, metrics_dev) -> None:
    """Adds step `step_index`'s metrics (device scalars) to the window.

    Raises:
      NonFiniteLossError: the loss or gradient norm is not finite.
    """
    metrics = {k: float(v) for k, v in jax.device_get(metrics_dev).items()}
    if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
      raise NonFiniteLossError(
          f"{self.options.name}: non-finite loss at step {step_index} (loss={metrics['loss']}, "
          f"grad_norm={metrics['grad_norm']}); stopped without saving this state. "
          f"Last good checkpoint: {self.ckpts.last_good()}")
    self.last_lr = metrics.pop("lr", float("nan"))
    if self.first_loss is None:
      self.first_loss = metrics["loss"]
    for k, v in metrics.items():
      self.window[k] = self.window.get(k, 0.0) + v
    self.window_n += 1

  def report(self, step: int) -> None:
    """The progress line and training scalars of the window ending at `step` (if it has steps)."""
    if not self.window_n:
      return
    now = time.time()
    sps = self.steps_window / max(now - self.t_window, 1e-9)
    self.final_train = {k: v / self.window_n for k, v in self.window.items()}
    self.writer.write_scalars(step, {**{f"train/{k}": v for k, v in self.final_train.items()},
                                     "train/lr": self.last_lr, "train/steps_per_s": sps})
    total = self.options.total_steps
    logging.info("%s: step %d/%d loss %.4f lr %.3e %.2f steps/s ETA %s", self.options.name, step,
                 total, self.final_train["loss"], self.last_lr, sps,
                 _format_eta((total - step) / sps))
    self.window.clear()
    self.window_n = 0
    self.t_window, self.steps_window = now, 0


class _Evaluator:
  """Runs the evaluation, logs and writes its metrics, keeps the best checkpoint."""

  def __init__(self, eval_fn, options: LoopOptions, writer, ckpts: Checkpoints):
    self.eval_fn, self.options, self.writer, self.ckpts = eval_fn, options, writer, ckpts
    self.final_eval: dict[str, float] = {}
    self.best_value = self.best_step = self.best_metrics = None
    if options.best_metric is not None:
      self.best_step, self.best_metrics = ckpts.best_so_far()
      if self.best_metrics is not None:
        self.best_value = self.best_metrics.get(options.best_metric)

  def __call__(self, variables: PyTree, step: int) -> None:
    """Evaluates `variables` after update `step`.

    Raises:
      KeyError: the metrics lack `best_metric`.
    """
    name = self.options.name
    t0 = time.time()
    result = self.eval_fn(variables, step)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    self.final_eval = dict(metrics, step=step)
    self.writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    if result.images:
      self.writer.write_images(step, {f"eval/{k}": np.asarray(v) for k, v in result.images.items()})
    line = " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
    logging.info("%s: eval at step %d: %s (%.1f s)", name, step, line, time.time() - t0)
    key = self.options.best_metric
    if key is None:
      return
    if key not in metrics:
      raise KeyError(f"{name}: eval metrics have no {key!r} (have {sorted(metrics)})")
    value, best = metrics[key], self.best_value
    better = best is None or (value > best if self.options.best_mode == "max" else value < best)
    if better and math.isfinite(value) and self.ckpts.save_best(step, variables, metrics):
      self.best_value, self.best_step, self.best_metrics = value, step, metrics
      logging.info("%s: new best %s %.4f at step %d", name, key, value, step)

  def best_eval(self) -> dict[str, float]:
    """Metrics and step of the best evaluation ({} when none)."""
    if self.best_step is None:
      return {}
    return dict(self.best_metrics or {}, step=self.best_step)


def _state_creator(task: Task) -> Callable[[int], TrainState]:
  """seed -> freshly initialised `TrainState` (jit- and eval_shape-able)."""
  def create_state(seed):
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = dict(task.init_variables(init_rng))
    return TrainState(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                      opt_state=task.tx.init(variables["params"]), step=jnp.zeros((), jnp.int32),
                      rng=step_rng)
  return create_state


def _fresh_state(task: Task, seed: int, shardings: PyTree, mesh: Mesh) -> TrainState:
  """A new replicated state: random initialisation, then `task.pretrained` if given."""
  # Non-partitionable threefry: the ~140 initialisers compile in ~7 s instead of ~35 s on CPU
  # (see oeem_jax.models.init_variables); parameters are replicated, so nothing is lost.
  with jax.threefry_partitionable(False):
    state = jax.jit(_state_creator(task), static_argnums=0, out_shardings=shardings)(seed)
  if task.pretrained is None:
    return state
  host = jax.device_get(state.variables)
  variables = dict(task.pretrained(host))
  variables.setdefault("batch_stats", {})

  def load(state, variables):
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                         opt_state=task.tx.init(variables["params"]))
  return jax.jit(load, donate_argnums=0, out_shardings=shardings)(state, replicate(variables, mesh))


def _earlier_files(stage_dir: Path) -> list[str]:
  """Top-level entries of stage_dir holding files (not folders: other processes may be creating
  those right now) of an earlier attempt; the network card, which the stage writes before training
  starts, is not one, nor are the folders of earlier self-training rounds (`artifacts.round_dir`)."""
  from oeem_jax.runtime.artifacts import NETWORK_CARD, ROUND_PREFIX

  if not stage_dir.is_dir():
    return []
  return sorted({p.relative_to(stage_dir).parts[0] for p in stage_dir.rglob("*")
                 if p.is_file() and p.relative_to(stage_dir).parts != (NETWORK_CARD,)
                 and not p.relative_to(stage_dir).parts[0].startswith(ROUND_PREFIX)})


def _initial_state(task: Task, options: LoopOptions, mesh: Mesh, ckpts: Checkpoints,
                   identity: Mapping[str, Any], earlier: list[str]
                   ) -> tuple[TrainState, PyTree, int | None]:
  """(state, its shardings, step resumed from or None): the newest checkpoint, or a fresh state."""
  name, every = options.name, options.checkpoint_every
  abstract_state = jax.eval_shape(_state_creator(task), options.seed)
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_state)
  resumed_from = ckpts.latest_step()
  if resumed_from is None:
    if earlier:
      logging.warning(
          "%s: %s holds no checkpoint (an earlier attempt left %s; with checkpoint_every %d it saved "
          "%s): training restarts from step 0", name, ckpts.directory, ", ".join(earlier), every,
          f"every {every} steps" if every > 0 else "only at the end")
    else:
      logging.info("%s: no checkpoint in %s: starting from step 0", name, ckpts.directory)
    return _fresh_state(task, options.seed, shardings, mesh), shardings, None
  # The run's identity first: a checkpoint of another configuration is refused before its arrays
  # are read; then the state is restored straight into the replicated layout.
  ckpts.check_identity(resumed_from, identity)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, shardings)
  state = ckpts.restore_state(resumed_from, abstract_state)
  logging.info("%s: resumed from %s/%d", name, ckpts.directory, resumed_from)
  return state, shardings, resumed_from


@dataclasses.dataclass
class _Run:
  """The collaborators of one `train_loop` call (what `_run_steps` needs besides the state)."""
  task: Task
  options: LoopOptions
  mesh: Mesh
  ckpts: Checkpoints
  writer: Any
  progress: _Progress
  evaluator: _Evaluator
  identity: dict[str, Any]
  step_hook: Callable[[int], None] | None


def _next_batch(iterator, i: int, run: _Run) -> Batch:
  try:
    return next(iterator)
  except StopIteration:
    raise ValueError(f"{run.options.name}: the data iterator ended at step {i} before total_steps "
                     f"{run.options.total_steps}") from None


def _run_steps(state: TrainState, jit_step, run: _Run) -> TrainState:
  """Updates `state` from its step to `total_steps` with logging, evaluations and checkpoints.

  A step's metrics are fetched while the next step runs, except at a log, evaluation or save.
  """
  opts, ckpts, progress, evaluator = run.options, run.ckpts, run.progress, run.evaluator
  start_step = int(jax.device_get(state.step))
  total = opts.total_steps
  pending = None
  iterator = run.task.make_iterator(start_step) if start_step < total else iter(())
  with _SigtermFlag() as sigterm:
    for i in range(start_step, total):
      local = _next_batch(iterator, i, run)
      if i == total - 1:
        # Release the input pipeline now: torn down after an evaluation, a tf.data pipeline was
        # measured to take ~30 s to close.
        iterator = None
      state, metrics_dev = jit_step(state, shard_batch(local, run.mesh))
      if pending is not None:
        progress.record(*pending)  # the previous step, while this one runs on the device
      pending = (i, metrics_dev)
      step = i + 1
      progress.steps_window += 1
      # In multi-process runs JAX's preemption notifier agrees on one step across processes.
      preempt = sigterm.fired or (jax.process_count() > 1 and ckpts.reached_preemption(step))
      do_log, do_eval, do_save = opts.due(step, preempt, run.task.eval_fn is not None)
      if do_log or do_eval or do_save:
        progress.record(*pending)
        pending = None
      if do_log:
        progress.report(step)
      if do_eval:
        t_eval = time.time()
        evaluator(state.variables, step)
        progress.t_window += time.time() - t_eval  # steps/s and ETA count training time only
      if do_save:
        ckpts.save(step, state, {"step": step, "total_steps": total, "seed": opts.seed,
                                 "identity": run.identity})
      if run.step_hook is not None:
        run.step_hook(step)
      if preempt and step < total:
        ckpts.wait()
        run.writer.flush()
        logging.warning("%s: SIGTERM/preemption at step %d: checkpoint saved, exiting", opts.name, step)
        raise Preempted(step)
    if pending is not None:
      progress.record(*pending)
    if start_step >= total and run.task.eval_fn is not None and not evaluator.final_eval:
      evaluator(state.variables, int(start_step))
  return state


# ---------------------------------------------------------------------------------------------------
# The loop


def train_loop(stage_dir: str | Path, task: Task, options: LoopOptions, *, mesh: Mesh | None = None,
               run_identity: Mapping[str, Any] | None = None,
               step_hook: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Trains, checkpoints, evaluates and resumes; returns the summary fields of the run.

  Args:
    stage_dir: output folder (WORKDIR/<stage>); holds checkpoints/, best/, tensorboard/.
    task: what is trained (`Task`: init, loss, data, optimiser, optional pretrained hook and eval).
    options: how (`LoopOptions`: steps, seed, checkpoint / log / eval periods, best metric).
    mesh: device mesh (default `make_mesh()`).
    run_identity: JSON-able values that define the run (`run_identity(config, ...)`); stored with
      every checkpoint, and a resume whose identity differs is refused (errors.ConfigError
      naming the first differing key, its old and new values) instead of silently continuing
      another run.
    step_hook: called with the step number after every update (tests use it to kill the process).

  Returns:
    dict with steps, resumed_from, train_time_s, steps_per_s, first_loss (loss of the first step run
    by this call), final_train (mean metrics over the last log window), final_eval, best_eval (+
    best_step), params_digest, checkpoint_dir, best_dir, num_devices, num_processes.

  Raises:
    NonFiniteLossError: a step's loss or gradient norm is not finite (message names the step and
      the last good checkpoint).
    Preempted: SIGTERM / preemption; a checkpoint of the current step was saved first.
    ValueError: bad options (steps, best_mode), a batch not divisible by the device count, a data
      iterator that ends early, or (errors.ConfigError) the newest checkpoint in stage_dir
      belongs to a run with a different `run_identity`.
    KeyError: the evaluation metrics lack `options.best_metric`.
  """
  stage_dir = Path(stage_dir)
  identity = json.loads(json.dumps(run_identity or {}, default=str))
  options.validate()
  quiet_orbax_logs()
  mesh = mesh or make_mesh()
  earlier = _earlier_files(stage_dir)  # before the managers create their folders
  ckpts = Checkpoints(stage_dir, options.keep, options.async_checkpoint,
                      best_metric=options.best_metric, best_mode=options.best_mode)
  state, shardings, resumed_from = _initial_state(task, options, mesh, ckpts, identity, earlier)
  start_step = int(jax.device_get(state.step))
  writer = _make_writer(stage_dir, options.tensorboard)
  run = _Run(task=task, options=options, mesh=mesh, ckpts=ckpts, writer=writer,
             progress=_Progress(options, writer, ckpts),
             evaluator=_Evaluator(task.eval_fn, options, writer, ckpts), identity=identity,
             step_hook=step_hook)
  jit_step = jax.jit(make_step_fn(task.loss_fn, task.tx, task.schedule), donate_argnums=0,
                     out_shardings=(shardings, NamedSharding(mesh, P())))
  logging.info("%s: steps %d..%d on %d device(s) (%d process(es)), mesh %s", options.name,
               start_step, options.total_steps, mesh.size, jax.process_count(), dict(mesh.shape))
  t_start = time.time()
  run.progress.t_window = time.time()
  try:
    state = _run_steps(state, jit_step, run)
  finally:  # also on errors: good checkpoints whose async write is under way get finished
    ckpts.wait()
    writer.flush()
    writer.close()
    ckpts.close()
  train_time = time.time() - t_start
  return _summary(state, run, resumed_from, start_step, train_time, stage_dir)


def _summary(state: TrainState, run: _Run, resumed_from: int | None, start_step: int,
             train_time: float, stage_dir: Path) -> dict[str, Any]:
  """`train_loop`'s return value (see there); logs the closing line."""
  total = run.options.total_steps
  done = max(total - start_step, 0)
  digest = params_digest(state.params)
  logging.info("%s: finished at step %d in %.1f s; params_digest %s", run.options.name, total,
               train_time, digest[:16])
  return {
      "steps": int(jax.device_get(state.step)),
      "resumed_from": resumed_from,
      "train_time_s": round(train_time, 3),
      "steps_per_s": round(done / train_time, 4) if train_time > 0 and done else None,
      "first_loss": run.progress.first_loss,
      "final_train": run.progress.final_train,
      "final_eval": run.evaluator.final_eval,
      "best_eval": run.evaluator.best_eval(),
      "params_digest": digest,
      "checkpoint_dir": str(stage_dir / "checkpoints"),
      "best_dir": str(stage_dir / "best") if run.options.best_metric is not None else None,
      "num_devices": run.mesh.size,
      "num_processes": jax.process_count(),
  }
