"""Generic data-parallel training loop shared by the `cls` and `seg` stages.

The loop knows nothing about models or data. A stage hands it:

* `init_variables(rng) -> {"params": ..., "batch_stats": ...}` (traced under `jax.jit`), and
  optionally a host-side `pretrained(variables) -> variables` hook (e.g. imported ImageNet weights);
* `loss_fn(params, batch_stats, batch, rng) -> (loss, (new_batch_stats, metrics))`, traced under
  `jax.jit` with the *global* batch (so BatchNorm statistics are over the global batch: synchronised
  BN for free);
* `make_iterator(start_step)` yielding this process's slice of batch `start_step`, `start_step + 1`, ...
  as dicts of NumPy arrays (the data pipelines are a pure function of (seed, step), which makes resume
  exact);
* optionally `eval_fn(variables, step) -> EvalResult` run every `eval_every` steps and at the end.

Parallelism: one 1-D `jax.sharding.Mesh` over every device of every process, axis name `"data"`;
the batch is sharded along its leading axis with `NamedSharding(mesh, P("data"))`, the train state is
replicated (`P()`); the jitted step donates the state. Each process feeds only its own rows through
`jax.make_array_from_process_local_data`. Multi-host runs call `jax.distributed.initialize()` first
(`setup_distributed`).

Checkpoints (orbax `CheckpointManager`):

* `<stage_dir>/checkpoints/<step>/` — the whole `TrainState` (params, batch_stats, optimiser state,
  step, RNG) plus a small JSON `meta` item; saved every `checkpoint_every` steps, at the end, and when
  SIGTERM arrives; the newest `keep` are kept. A run started in a `stage_dir` that holds one resumes
  from the newest; the `meta` item stores the run's identity (`run_identity`: the config values that
  shape the trajectory) and a resume whose identity differs is refused.
* `<stage_dir>/best/<step>/` — `{"params", "batch_stats"}` of the best evaluation so far by
  `best_metric` (one kept, saved only when the metric strictly improves; the metric values are
  stored as orbax step metrics so a resumed run knows the best so far).

Exactness: the dropout RNG of step `s` is `fold_in(state.rng, s)` and batch `s` comes from
`make_iterator(s)`, so a run killed at any point and restarted from its newest checkpoint replays
the same updates; on CPU the final parameters are bit-identical to an uninterrupted run
(tests/test_train.py checks `params_digest`).

Failure handling: a non-finite loss or gradient norm raises `NonFiniteLossError` naming the step;
a state is saved only after its step's loss and gradient norm were checked finite, so the newest
checkpoint on disk is always a good one. SIGTERM (single process) or a JAX preemption sync point
(multi-process) saves a checkpoint at the next step boundary and raises `Preempted` (a `SystemExit`
with code 143). Any other exception still lets checkpoint writes under way finish.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging as pyl
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
Batch = Mapping[str, np.ndarray]
LossFn = Callable[[PyTree, PyTree, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, tuple[PyTree, Mapping[str, jax.Array]]]]

DATA_AXIS = "data"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm of a training step was NaN or infinite."""


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


# ---------------------------------------------------------------------------------------------------
# Optimiser


def make_optimizer(lr: float, total_steps: int, *, momentum: float = 0.9, weight_decay: float = 0.0,
                   power: float = 0.9, end_lr: float = 0.0,
                   trainable_mask: PyTree | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum, L2 weight decay added to the gradient, and a polynomial ("poly") schedule.

  Implements PyTorch `torch.optim.SGD(lr, momentum, weight_decay)` semantics (REFERENCE.md §4):
  `g += weight_decay * p; buf = momentum * buf + g; p -= lr_t * buf` (first step `buf = g`), with
  `lr_t = (lr - end_lr) * (1 - t / total_steps) ** power + end_lr` for update `t = 0 .. total_steps-1`
  (mmseg's poly policy with `min_lr = end_lr`). The reference classifier's optimiser bug
  (REFERENCE.md §2: weight decay passed as momentum, lr frozen after 20 iterations) is deliberately
  NOT reproduced.

  Args:
    lr: base learning rate (> 0).
    total_steps: number of updates of the run (> 0); the schedule reaches `end_lr` there.
    momentum: heavy-ball momentum (PyTorch `momentum`, no dampening, no Nesterov).
    weight_decay: L2 coefficient added to the gradient (applies to every trainable parameter).
    power: poly exponent.
    end_lr: floor of the schedule (learning rate at and after `total_steps`).
    trainable_mask: optional pytree of bools with the structure of the params; `False` leaves get a
      zero update (frozen: no decay, no momentum).

  Returns:
    (optax transformation, schedule) — the schedule maps an update count to its learning rate.

  Raises:
    ValueError: non-positive `lr` or `total_steps`.
  """
  if lr <= 0 or total_steps <= 0:
    raise ValueError(f"make_optimizer: lr ({lr}) and total_steps ({total_steps}) must be > 0")
  schedule = optax.polynomial_schedule(init_value=lr, end_value=end_lr, power=power,
                                       transition_steps=total_steps)
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.sgd(schedule, momentum=momentum or None))
  tx = optax.chain(*parts)
  if trainable_mask is not None:
    labels = jax.tree.map(lambda m: "train" if bool(m) else "frozen", trainable_mask)
    tx = optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def loop_options(config) -> dict[str, Any]:
  """The `train_loop` keyword arguments a stage config fixes: seed, checkpoint_every, keep,
  log_every, eval_every and async_checkpoint (keys seed, checkpoint.every / keep / async_save,
  train.log_every / eval_every). Shared by stages cls and seg."""
  return dict(seed=int(config.seed), checkpoint_every=int(config.checkpoint.every),
              keep=int(config.checkpoint.keep), log_every=int(config.train.log_every),
              eval_every=int(config.train.eval_every),
              async_checkpoint=bool(config.checkpoint.async_save))


def optimizer_from_config(train_cfg, total_steps: int, trainable_mask: PyTree | None = None
                          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`make_optimizer` from a config's `train` section (keys lr, momentum, weight_decay, power, end_lr)."""
  return make_optimizer(float(train_cfg.lr), total_steps, momentum=float(train_cfg.momentum),
                        weight_decay=float(train_cfg.weight_decay), power=float(train_cfg.power),
                        end_lr=float(train_cfg.end_lr), trainable_mask=trainable_mask)


# ---------------------------------------------------------------------------------------------------
# Devices and hosts


def setup_distributed(mode: str | bool = "auto") -> bool:
  """Calls `jax.distributed.initialize()` when asked; returns whether JAX runs multi-process.

  Call it before anything touches a JAX device. Modes (config key `train.distributed`):
    * "auto" (default): initialise when `$JAX_COORDINATOR_ADDRESS` is set or `$OEEM_DISTRIBUTED=1`;
    * "on" / True: always initialise (JAX auto-detects TPU pods, SLURM, Open MPI, Kubernetes);
    * "off" / False: never.
  `$JAX_COORDINATOR_ADDRESS` (host:port of process 0), `$JAX_NUM_PROCESSES` and `$JAX_PROCESS_ID`
  are passed on when set (what launch/train_multihost.sh exports). Idempotent.

  Raises:
    ValueError: unknown mode.
  """
  mode = {True: "on", False: "off"}.get(mode, mode)
  if mode not in ("auto", "on", "off"):
    from oeem_jax.config_check import ConfigError
    raise ConfigError("train.distributed", repr(mode), "'auto', 'on' or 'off'")
  wanted = mode == "on" or (mode == "auto" and (
      bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or os.environ.get("OEEM_DISTRIBUTED") == "1"))
  if wanted and not jax.distributed.is_initialized():
    kwargs: dict[str, Any] = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
      kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
      kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
  return jax.process_count() > 1


def make_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
  """1-D mesh named "data" over `devices` (default: every device of every process)."""
  devs = np.asarray(list(jax.devices() if devices is None else devices))
  return Mesh(devs, (DATA_AXIS,))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a pytree of host/device arrays replicated on every device of `mesh` (multi-host safe:
  every process must pass the same values)."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, tree)


def shard_batch(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded along axis 0 over the "data" axis.

  Args:
    batch: dict of arrays [B_local, ...]; every process passes its own B_local rows, in process order.

  Raises:
    ValueError: the global batch is not divisible by the number of devices.
  """
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    global_rows = value.shape[0] * jax.process_count()
    if global_rows % mesh.size:
      from oeem_jax.config_check import ConfigError
      raise ConfigError("train.batch_size", str(global_rows),
                        f"a multiple of the {mesh.size} devices of the mesh (batch[{key!r}])")
    sharding = NamedSharding(mesh, P(DATA_AXIS, *([None] * (value.ndim - 1))))
    out[key] = jax.make_array_from_process_local_data(sharding, value,
                                                      (global_rows,) + value.shape[1:])
  return out


def shard_global(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array that every process holds in full -> global array sharded over "data" (axis 0).

  For evaluation inputs (each process computes the same list). Axis 0 must be divisible by the
  mesh size.
  """
  x = np.asarray(x)
  sharding = NamedSharding(mesh, P(DATA_AXIS, *([None] * (x.ndim - 1))))
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# ---------------------------------------------------------------------------------------------------
# Run identity

_NOT_IDENTITY = ("log_every", "distributed", "cache_dir", "allow_partial")


def run_identity(config, sections: Sequence[str]) -> dict[str, Any]:
  """The config values that define a run's trajectory, for the resume check of `train_loop`.

  Takes `stage`, `seed`, the whole `train` section and the named `sections`, leaving out what does
  not change the parameters: logging, evaluation settings (keys containing "eval"), checkpointing,
  multi-host switch, data cache folder. `data.dir` is made absolute.

  Returns:
    JSON-able nested dict.
  """
  def clean(d: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
      if k in _NOT_IDENTITY or "eval" in k:
        continue
      out[k] = clean(v) if isinstance(v, Mapping) else (list(v) if isinstance(v, tuple) else v)
    return out

  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  ident = {"stage": cfg.get("stage"), "seed": cfg.get("seed"), "train": clean(cfg.get("train", {}))}
  for name in sections:
    if name in cfg:
      ident[name] = clean(cfg[name]) if isinstance(cfg[name], Mapping) else cfg[name]
  if isinstance(ident.get("data"), dict) and ident["data"].get("dir"):
    ident["data"]["dir"] = str(Path(ident["data"]["dir"]).expanduser().resolve())
  return ident


def identity_changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(dotted key, old value, new value) for every leaf where two `run_identity` dicts differ
  ("<absent>" for a key only one of them has), in sorted key order."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += identity_changes(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
    return out
  return [] if old == new else [(prefix[:-1], old, new)]


# ---------------------------------------------------------------------------------------------------
# Digest


def params_digest(params: PyTree) -> str:
  """SHA-256 (hex) of the parameters, for comparing runs bit for bit.

  Leaves are visited in the order of their key paths sorted as strings (e.g. "['conv1']['kernel']");
  for each, the path, dtype, shape and the C-order bytes of the array are hashed.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  h = hashlib.sha256()
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.ascontiguousarray(jax.device_get(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def _managers(stage_dir: Path, keep: int, async_save: bool
              ) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  common = dict(create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
  latest = ocp.CheckpointManager(
      (stage_dir / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.LatestN(n=max(1, keep)), **common))
  best = ocp.CheckpointManager(
      (stage_dir / "best").absolute(),
      options=ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.LatestN(n=1), **common))
  return latest, best


def _restore_here(directory: Path, item: str, which: str | int) -> tuple[PyTree, int] | None:
  """Restores `item` of a checkpoint onto this process's first device, whatever devices saved it.

  The arrays' shapes and dtypes come from the checkpoint's metadata; giving orbax that target
  (instead of none) is what lets a checkpoint written on N devices or hosts be read on one.

  Returns:
    (host NumPy tree, step), or None when `directory` holds no checkpoint.

  Raises:
    FileNotFoundError: `which` is a step number that is not in `directory`.
  """
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  handlers = {item: ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(directory.absolute(), item_handlers=handlers, options=options) as m:
    step = m.latest_step() if which in ("best", "latest") else int(which)
    if step is None:
      return None
    if step not in m.all_steps():
      raise FileNotFoundError(f"checkpoint {which!r} not found in {directory} (have {list(m.all_steps())})")
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here),
                          m.item_metadata(step)[item])
    out = m.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
  return jax.device_get(out[item]), step


def load_variables(stage_dir: str | Path, which: str | int = "best") -> tuple[dict[str, PyTree], int]:
  """Reads `{"params", "batch_stats"}` saved by `train_loop` (host NumPy arrays), also from a
  checkpoint written by another number of devices or processes (e.g. a multi-host run read by a
  1-process eval).

  Args:
    stage_dir: WORKDIR/<stage> of a training stage.
    which: "best" (the best-by-validation checkpoint, falling back to the newest periodic one when
      no evaluation ran), "latest", or a step number of a periodic checkpoint.

  Returns:
    (variables, step).

  Raises:
    FileNotFoundError: no such checkpoint under `stage_dir`.
  """
  stage_dir = Path(stage_dir)
  quiet_orbax_logs()
  if which == "best" and (stage_dir / "best").is_dir():
    found = _restore_here(stage_dir / "best", "variables", "best")
    if found is not None:
      return found
  ckpt = stage_dir / "checkpoints"
  if not ckpt.is_dir():
    raise FileNotFoundError(f"no checkpoints under {stage_dir} (expected {ckpt}/<step>/)")
  found = _restore_here(ckpt, "state", which)
  if found is None:
    raise FileNotFoundError(f"checkpoint {which!r} not found in {ckpt} (it holds none)")
  state, step = found
  return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}, step


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
# The loop


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


class _QuietOrbax(pyl.Filter):
  """Drops orbax's INFO chatter (several lines per save) and the warnings it gives for every
  read-only manager (`load_variables`) from the absl log; other warnings pass."""

  def filter(self, record: pyl.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if record.levelno == pyl.WARNING:
      return "read only" not in record.getMessage() and "read_only=True" not in record.getMessage()
    return record.levelno > pyl.WARNING


_QUIET = _QuietOrbax()


def quiet_orbax_logs() -> None:
  """Hides orbax's INFO lines from the absl log (idempotent); its warnings and errors still show."""
  logger = pyl.getLogger("absl")
  if _QUIET not in logger.filters:
    logger.addFilter(_QUIET)


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


def train_loop(
    *,
    stage_dir: str | Path,
    init_variables: Callable[[jax.Array], Mapping[str, PyTree]],
    pretrained: Callable[[Mapping[str, PyTree]], Mapping[str, PyTree]] | None = None,
    loss_fn: LossFn,
    make_iterator: Callable[[int], Iterator[Batch]],
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    total_steps: int,
    seed: int,
    checkpoint_every: int,
    keep: int = 2,
    log_every: int = 50,
    eval_fn: Callable[[Mapping[str, PyTree], int], EvalResult] | None = None,
    eval_every: int = 0,
    best_metric: str | None = None,
    best_mode: str = "max",
    async_checkpoint: bool = True,
    mesh: Mesh | None = None,
    step_hook: Callable[[int], None] | None = None,
    name: str = "train",
    tensorboard: bool = True,
    run_identity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Trains, checkpoints, evaluates and resumes; returns the summary fields of the run.

  Args:
    stage_dir: output folder (WORKDIR/<stage>); holds checkpoints/, best/, tensorboard/.
    init_variables: rng (uint32[2]) -> {"params": ..., "batch_stats": ...} (batch_stats may be absent);
      traced under `jax.jit` (random initialisation only); when resuming it is only traced for shapes.
    pretrained: optional host-side hook applied to the fresh variables (NumPy) of a run that does not
      resume, e.g. to load imported ImageNet weights; returns variables of the same structure.
    loss_fn: (params, batch_stats, batch, rng) -> (scalar loss, (new batch_stats, dict of scalar
      metrics)); `batch` holds global arrays (this process's rows from `make_iterator`, sharded).
    make_iterator: start_step -> iterator over this process's rows of batches start_step, ... (dicts
      of NumPy arrays with a leading batch axis); must be a pure function of the step for exact resume.
    tx, schedule: optimiser and its learning-rate schedule (`make_optimizer`); schedule only for logs.
    total_steps: number of updates of the whole run (resumed runs continue to it).
    seed: seeds `init_variables` and the per-step RNG.
    checkpoint_every: save every this many steps (and at the end); <= 0 saves only at the end.
    keep: number of periodic checkpoints kept.
    log_every: a progress line and TensorBoard scalars every this many steps.
    eval_fn: (variables, step) -> EvalResult; run every `eval_every` steps and after the last step.
      It runs on every process (same values everywhere); only process 0 writes files.
    best_metric: key of `EvalResult.metrics` deciding the best checkpoint (None: no best/ kept).
    best_mode: "max" or "min".
    async_checkpoint: orbax async saving (training continues while the files are written).
    mesh: device mesh (default `make_mesh()`).
    step_hook: called with the step number after every update (tests use it to kill the process).
    name: label of the log lines.
    tensorboard: write TensorBoard events under stage_dir/tensorboard (clu metric writers; process 0).
    run_identity: JSON-able values that define the run (`run_identity(config, ...)`); stored with
      every checkpoint, and a resume whose identity differs is refused (config_check.ConfigError
      naming the first differing key, its old and new values) instead of
      silently continuing another run.

  Returns:
    dict with steps, resumed_from, train_time_s, steps_per_s, first_loss (loss of the first step run
    by this call), final_train (mean metrics over the last log window), final_eval, best_eval (+ best_step), params_digest, checkpoint_dir, best_dir.

  Raises:
    NonFiniteLossError: a step's loss or gradient norm is not finite (message names the step and
      the last good checkpoint).
    Preempted: SIGTERM / preemption; a checkpoint of the current step was saved first.
    ValueError: bad arguments (steps, best_mode, batch not divisible by the device count), or the
      newest checkpoint in stage_dir belongs to a run with a different `run_identity`.
  """
  stage_dir = Path(stage_dir)
  identity = json.loads(json.dumps(run_identity or {}, default=str))
  if total_steps <= 0:
    raise ValueError(f"{name}: total_steps must be > 0, got {total_steps}")
  if best_mode not in ("max", "min"):
    raise ValueError(f"{name}: best_mode must be 'max' or 'min', got {best_mode!r}")
  quiet_orbax_logs()
  mesh = mesh or make_mesh()
  replicated = NamedSharding(mesh, P())
  is_chief = jax.process_index() == 0

  # ---- state: restore the newest checkpoint, or initialise (+ pretrained weights) --------------
  def create_state(seed):
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = dict(init_variables(init_rng))
    return TrainState(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(variables["params"]), step=jnp.zeros((), jnp.int32),
                      rng=step_rng)

  abstract_state = jax.eval_shape(create_state, seed)
  state_shardings = jax.tree.map(lambda _: replicated, abstract_state)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_shardings)

  # Files (not folders: other processes may be creating those right now) of an earlier attempt.
  earlier = sorted({p.relative_to(stage_dir).parts[0] for p in stage_dir.rglob("*") if p.is_file()}
                   ) if stage_dir.is_dir() else []
  latest_mngr, best_mngr = _managers(stage_dir, keep, async_checkpoint)
  resumed_from = latest_mngr.latest_step()
  if resumed_from is None:
    if earlier:
      logging.warning(
          "%s: %s holds no checkpoint (an earlier attempt left %s; with checkpoint_every %d it saved "
          "%s): training restarts from step 0", name, latest_mngr.directory, ", ".join(earlier),
          checkpoint_every, f"every {checkpoint_every} steps" if checkpoint_every > 0 else
          "only at the end")
    else:
      logging.info("%s: no checkpoint in %s: starting from step 0", name, latest_mngr.directory)
    # Non-partitionable threefry: the ~140 initialisers compile in ~7 s instead of ~35 s on CPU
    # (see oeem_jax.models.init_variables); parameters are replicated, so nothing is lost.
    with jax.threefry_partitionable(False):
      state = jax.jit(create_state, static_argnums=0, out_shardings=state_shardings)(seed)
    if pretrained is not None:
      host = jax.device_get(state.variables)
      variables = dict(pretrained(host))
      variables.setdefault("batch_stats", {})

      def load(state, variables):
        return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                             opt_state=tx.init(variables["params"]))
      state = jax.jit(load, donate_argnums=0, out_shardings=state_shardings)(
          state, replicate(variables, mesh))
      del host, variables
  else:  # no initialisation needed: restore straight into the replicated layout
    # The run's identity first (a small JSON item): a checkpoint of another configuration is refused
    # before its arrays are read (another model.width would not even restore).
    meta = latest_mngr.restore(resumed_from, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    old_identity = (meta["meta"] or {}).get("identity", {})
    diff = identity_changes(old_identity, identity)
    if diff:
      from oeem_jax.config_check import ConfigError, quote

      key, old, new = diff[0]
      also = f"; {len(diff) - 1} more key(s) differ: " + ", ".join(k for k, _, _ in diff[1:4]) + (
          " ..." if len(diff) > 4 else "") if len(diff) > 1 else ""
      was = "no value" if old == "<absent>" else quote(old)
      raise ConfigError(
          key, "<absent>" if new == "<absent>" else quote(new),
          f"{was}, as in the run whose step {resumed_from} is in {latest_mngr.directory}{also}; "
          "for another run use a new --workdir (or delete that folder)")
    restored = latest_mngr.restore(resumed_from, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    state = restored["state"]
    logging.info("%s: resumed from %s/%d", name, latest_mngr.directory, resumed_from)
  start_step = int(jax.device_get(state.step))
  best_value, best_step, best_metrics = None, None, None
  if best_metric is not None and best_mngr.latest_step() is not None:
    best_step = best_mngr.latest_step()
    best_metrics = best_mngr.metrics(best_step)
    best_value = None if best_metrics is None else best_metrics.get(best_metric)

  writer = _NullWriter()
  if tensorboard and is_chief:
    from clu import metric_writers  # imports TensorFlow: only when asked
    writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(stage_dir / "tensorboard")))

  # ---- the jitted step --------------------------------------------------------------------------
  jit_step = jax.jit(make_step_fn(loss_fn, tx, schedule), donate_argnums=0,
                     out_shardings=(state_shardings, replicated))

  # ---- helpers ----------------------------------------------------------------------------------
  last_saved = resumed_from
  window: dict[str, float] = {}
  window_n = 0
  last_lr = [float("nan")]
  first_loss: list[float] = []
  final_train: dict[str, float] = {}
  final_eval: dict[str, float] = {}

  def check(step_index: int, metrics_dev) -> None:
    nonlocal window_n
    metrics = {k: float(v) for k, v in jax.device_get(metrics_dev).items()}
    if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
      good = latest_mngr.latest_step()
      where = f"step {good} in {latest_mngr.directory}" if good is not None else "none saved yet"
      raise NonFiniteLossError(
          f"{name}: non-finite loss at step {step_index} (loss={metrics['loss']}, "
          f"grad_norm={metrics['grad_norm']}); stopped without saving this state. "
          f"Last good checkpoint: {where}")
    last_lr[0] = metrics.pop("lr", float("nan"))
    if not first_loss:
      first_loss.append(metrics["loss"])
    for k, v in metrics.items():
      window[k] = window.get(k, 0.0) + v
    window_n += 1

  def save(step: int) -> None:
    nonlocal last_saved
    if last_saved == step:
      return
    latest_mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"step": step, "total_steps": total_steps, "seed": seed,
                                "identity": identity})),
        force=True)
    last_saved = step

  def evaluate(step: int) -> None:
    nonlocal best_value, best_step, best_metrics, final_eval
    t0 = time.time()
    result = eval_fn(state.variables, step)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    final_eval = dict(metrics, step=step)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    if result.images:
      writer.write_images(step, {f"eval/{k}": np.asarray(v) for k, v in result.images.items()})
    line = " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
    logging.info("%s: eval at step %d: %s (%.1f s)", name, step, line, time.time() - t0)
    if best_metric is None:
      return
    if best_metric not in metrics:
      raise KeyError(f"{name}: eval metrics have no {best_metric!r} (have {sorted(metrics)})")
    value = metrics[best_metric]
    better = best_value is None or (value > best_value if best_mode == "max" else value < best_value)
    if better and math.isfinite(value) and step not in best_mngr.all_steps():
      best_mngr.save(step, args=ocp.args.Composite(variables=ocp.args.StandardSave(state.variables)),
                     metrics=metrics, force=True)
      best_value, best_step, best_metrics = value, step, metrics
      logging.info("%s: new best %s %.4f at step %d", name, best_metric, value, step)

  # ---- the loop ---------------------------------------------------------------------------------
  logging.info("%s: steps %d..%d on %d device(s) (%d process(es)), mesh %s", name, start_step,
               total_steps, mesh.size, jax.process_count(), dict(mesh.shape))
  t_start = time.time()
  t_window = time.time()
  steps_window = 0
  pending = None
  iterator = make_iterator(start_step) if start_step < total_steps else iter(())
  try:
    with _SigtermFlag() as sigterm:
      for i in range(start_step, total_steps):
        try:
          local = next(iterator)
        except StopIteration:
          raise ValueError(f"{name}: the data iterator ended at step {i} before total_steps "
                           f"{total_steps}") from None
        if i == total_steps - 1:
          # Release the input pipeline now: torn down after an evaluation, a tf.data pipeline was
          # measured to take ~30 s to close.
          iterator = None
        state, metrics_dev = jit_step(state, shard_batch(local, mesh))
        if pending is not None:
          check(*pending)  # the previous step, while this one runs on the device
        pending = (i, metrics_dev)
        step = i + 1
        steps_window += 1
        preempt = sigterm.fired
        if jax.process_count() > 1:  # JAX's preemption notifier agrees on one step across processes
          preempt = preempt or latest_mngr.reached_preemption(step)
        do_log = step % log_every == 0 or step == total_steps
        do_eval = eval_fn is not None and (step == total_steps or (eval_every > 0 and step % eval_every == 0))
        do_save = step == total_steps or preempt or (checkpoint_every > 0 and step % checkpoint_every == 0)
        if do_log or do_eval or do_save:
          check(*pending)
          pending = None
        if do_log and window_n:
          now = time.time()
          sps = steps_window / max(now - t_window, 1e-9)
          final_train = {k: v / window_n for k, v in window.items()}
          lr = last_lr[0]
          writer.write_scalars(step, {**{f"train/{k}": v for k, v in final_train.items()},
                                      "train/lr": lr, "train/steps_per_s": sps})
          logging.info("%s: step %d/%d loss %.4f lr %.3e %.2f steps/s ETA %s", name, step, total_steps,
                       final_train["loss"], lr, sps, _format_eta((total_steps - step) / sps))
          window.clear()
          window_n = 0
          t_window, steps_window = now, 0
        if do_eval:
          t_eval = time.time()
          evaluate(step)
          t_window += time.time() - t_eval  # steps/s and ETA count training time only
        if do_save:
          save(step)
        if step_hook is not None:
          step_hook(step)
        if preempt and step < total_steps:
          latest_mngr.wait_until_finished()
          best_mngr.wait_until_finished()
          writer.flush()
          logging.warning("%s: SIGTERM/preemption at step %d: checkpoint saved, exiting", name, step)
          raise Preempted(step)
      if pending is not None:
        check(*pending)
      if start_step >= total_steps and eval_fn is not None and not final_eval:
        evaluate(int(start_step))
  finally:  # also on errors: good checkpoints whose async write is under way get finished
    latest_mngr.wait_until_finished()
    best_mngr.wait_until_finished()
    writer.flush()
    writer.close()
    latest_mngr.close()
    best_mngr.close()
  train_time = time.time() - t_start
  done = max(total_steps - start_step, 0)
  digest = params_digest(state.params)
  logging.info("%s: finished at step %d in %.1f s; params_digest %s", name, total_steps, train_time,
               digest[:16])
  return {
      "steps": int(jax.device_get(state.step)),
      "resumed_from": resumed_from,
      "train_time_s": round(train_time, 3),
      "steps_per_s": round(done / train_time, 4) if train_time > 0 and done else None,
      "first_loss": first_loss[0] if first_loss else None,
      "final_train": final_train,
      "final_eval": final_eval,
      "best_eval": dict(best_metrics or {}, step=best_step) if best_step is not None else {},
      "params_digest": digest,
      "checkpoint_dir": str(stage_dir / "checkpoints"),
      "best_dir": str(stage_dir / "best") if best_metric is not None else None,
      "num_devices": mesh.size,
      "num_processes": jax.process_count(),
  }
