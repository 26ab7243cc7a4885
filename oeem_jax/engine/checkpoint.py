"""Checkpoints of a training stage folder, the run identity that guards a resume, and digests.

Layout of a stage folder (`train.train_loop` writes it, `load_variables` reads it):

* `<stage_dir>/checkpoints/<step>/` — item `state`: the whole `train.TrainState` (params,
  batch_stats, optimiser state, step, RNG) and item `meta`: JSON `{"step", "total_steps", "seed",
  "identity"}`; the newest `keep` are kept. `identity` is `run_identity(config, ...)`: a resume
  whose identity differs is refused (`Checkpoints.check_identity`).
* `<stage_dir>/best/<step>/` — item `variables`: `{"params", "batch_stats"}` of the best evaluation
  so far (one kept); the evaluation metrics are stored as orbax step metrics, so a resumed run knows
  the best value so far.
* `<stage_dir>/average/<step>/` — item `variables`: the uniform average of the periodic checkpoints
  from step `checkpoint.average_from` to the last (`average_checkpoints`, written by the training
  stage when that key is > 0), with its validation metrics as orbax step metrics; `step` is the
  last averaged step.
"""

from __future__ import annotations

import hashlib
import logging as pyl
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


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
  """SHA-256 (hex, 64 characters) of the parameters, for comparing runs bit for bit.

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
# orbax's log lines


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


# ---------------------------------------------------------------------------------------------------
# The managers of a training run


class Checkpoints:
  """The two orbax managers of a stage folder (module docstring): periodic and best.

  Args:
    stage_dir: WORKDIR/<stage>; checkpoints/ and best/ are created under it.
    keep: periodic checkpoints kept (at least 1).
    async_save: orbax async saving (training continues while the files are written).
    best_metric: the metric that ranks best checkpoints (None: no ranking, the newest is kept).
      orbax writes a checkpoint's metrics only when the manager ranks by them, so without it a
      resumed run would not know the best value so far.
    best_mode: "max" or "min".
  """

  def __init__(self, stage_dir: Path, keep: int, async_save: bool, best_metric: str | None = None,
               best_mode: str = "max"):
    common = dict(create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
    self.latest = ocp.CheckpointManager(
        (stage_dir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=max(1, keep)), **common))
    if best_metric is None:
      best_options = ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.LatestN(n=1), **common)
    else:
      best_options = ocp.CheckpointManagerOptions(
          best_fn=lambda metrics: metrics[best_metric], best_mode=best_mode, max_to_keep=1, **common)
    self.best = ocp.CheckpointManager((stage_dir / "best").absolute(), options=best_options)
    self._last_saved = self.latest.latest_step()

  @property
  def directory(self):
    """The periodic checkpoints' folder (absolute)."""
    return self.latest.directory

  def latest_step(self) -> int | None:
    """Step of the newest periodic checkpoint, or None."""
    return self.latest.latest_step()

  def last_good(self) -> str:
    """Where the newest periodic checkpoint is, for error messages."""
    good = self.latest.latest_step()
    return f"step {good} in {self.latest.directory}" if good is not None else "none saved yet"

  def check_identity(self, step: int, identity: Mapping[str, Any]) -> None:
    """Refuses to resume another run: compares `identity` with the one saved at `step`.

    Only the small JSON `meta` item is read (a checkpoint of another model.width would not even
    restore).

    Raises:
      errors.ConfigError (a ValueError): the identities differ; names the first differing
        key with its new and old values and counts the others.
    """
    meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    diff = identity_changes((meta["meta"] or {}).get("identity", {}), identity)
    if not diff:
      return
    from oeem_jax.config.check import quote
    from oeem_jax.errors import ConfigError

    key, old, new = diff[0]
    also = f"; {len(diff) - 1} more key(s) differ: " + ", ".join(k for k, _, _ in diff[1:4]) + (
        " ..." if len(diff) > 4 else "") if len(diff) > 1 else ""
    was = "no value" if old == "<absent>" else quote(old)
    raise ConfigError(
        key, "<absent>" if new == "<absent>" else quote(new),
        f"{was}, as in the run whose step {step} is in {self.latest.directory}{also}; "
        "for another run use a new --workdir (or delete that folder)")

  def restore_state(self, step: int, abstract_state: PyTree) -> PyTree:
    """The `state` item of periodic checkpoint `step`, laid out as `abstract_state` (a pytree of
    `jax.ShapeDtypeStruct`s with shardings) says."""
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any]) -> None:
    """Saves `state` and the JSON `meta` as periodic checkpoint `step` (nothing when that step is
    the one saved or restored last)."""
    if self._last_saved == step:
      return
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(dict(meta))), force=True)
    self._last_saved = step

  def best_so_far(self) -> tuple[int | None, dict[str, float] | None]:
    """(step, metrics) of the kept best checkpoint, or (None, None)."""
    step = self.best.latest_step()
    return (None, None) if step is None else (step, self.best.metrics(step))

  def save_best(self, step: int, variables: PyTree, metrics: Mapping[str, float]) -> bool:
    """Saves `variables` and `metrics` as the best checkpoint; False (nothing saved) when a best
    checkpoint of `step` exists already."""
    if step in self.best.all_steps():
      return False
    self.best.save(step, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables)),
                   metrics=dict(metrics), force=True)
    return True

  def reached_preemption(self, step: int) -> bool:
    """JAX's preemption sync point (multi-process runs): True on every process at the same step."""
    return self.latest.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until the writes under way (async saving) are finished."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    """Closes both managers."""
    self.latest.close()
    self.best.close()


# ---------------------------------------------------------------------------------------------------
# Reading a stage's variables anywhere


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


AVERAGE_DIR = "average"


def periodic_steps(stage_dir: str | Path) -> list[int]:
  """The steps of the periodic checkpoints kept in `<stage_dir>/checkpoints/`, ascending ([] if none)."""
  ckpt = Path(stage_dir) / "checkpoints"
  if not ckpt.is_dir():
    return []
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  with ocp.CheckpointManager(ckpt.absolute(), options=options) as m:
    return sorted(int(s) for s in m.all_steps())


def average_trees(trees: Sequence[PyTree]) -> PyTree:
  """The leaf-wise uniform mean of variable trees of one structure (summed in float64, cast back to
  each leaf's dtype): the weight averaging of SWA (Izmailov et al., UAI 2018), applied to
  `{"params", "batch_stats"}` alike (BN running means and variances are averaged too, not
  re-estimated).

  Raises:
    ValueError: no trees, or trees whose structures differ.
  """
  if not trees:
    raise ValueError("average_trees: no trees to average")
  def mean(*leaves):
    first = np.asarray(leaves[0])
    return (sum(np.asarray(x, np.float64) for x in leaves) / len(leaves)).astype(first.dtype)
  return jax.tree.map(mean, *trees)


def average_checkpoints(stage_dir: str | Path, steps: Sequence[int]) -> PyTree:
  """The uniform average (`average_trees`) of the periodic checkpoints of `stage_dir` at `steps`
  (`config.check.averaged_steps`: every checkpoint.every steps and the last, from
  checkpoint.average_from on; a checkpoint a preemption saved between them is left out).

  Returns:
    {"params", "batch_stats"} host arrays.

  Raises:
    FileNotFoundError: a step without its periodic checkpoint (the message lists those kept).
  """
  kept = periodic_steps(stage_dir)
  missing = [s for s in steps if s not in kept]
  if missing or not steps:
    folder = Path(stage_dir) / "checkpoints"
    raise FileNotFoundError(f"no periodic checkpoint of step(s) {missing or list(steps)} in {folder} "
                            f"(have {kept}); checkpoint.keep must keep every checkpoint from "
                            "checkpoint.average_from on")
  return average_trees([load_variables(stage_dir, s)[0] for s in steps])


def save_average(stage_dir: str | Path, step: int, variables: PyTree,
                 metrics: Mapping[str, float]) -> Path:
  """Writes `variables` (and `metrics`) as `<stage_dir>/average/<step>/`, replacing an older one."""
  folder = (Path(stage_dir) / AVERAGE_DIR).absolute()
  options = ocp.CheckpointManagerOptions(
      create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False,
      preservation_policy=ocp.checkpoint_managers.LatestN(n=1))
  with ocp.CheckpointManager(folder, options=options) as m:
    m.save(step, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables)),
           metrics=dict(metrics), force=True)
    m.wait_until_finished()
  return folder


def load_variables(stage_dir: str | Path, which: str | int = "best") -> tuple[dict[str, PyTree], int]:
  """Reads `{"params", "batch_stats"}` saved by `train_loop` (host NumPy arrays), also from a
  checkpoint written by another number of devices or processes (e.g. a multi-host run read by a
  1-process eval).

  Args:
    stage_dir: WORKDIR/<stage> of a training stage.
    which: "best" (the best-by-validation checkpoint, falling back to the newest periodic one when
      no evaluation ran), "average" (the averaged checkpoint, `average_checkpoints`), "latest", or
      a step number of a periodic checkpoint.

  Returns:
    (variables, step).

  Raises:
    FileNotFoundError: no such checkpoint under `stage_dir`.
  """
  stage_dir = Path(stage_dir)
  quiet_orbax_logs()
  if which == "average":
    found = None
    if (stage_dir / AVERAGE_DIR).is_dir():
      found = _restore_here(stage_dir / AVERAGE_DIR, "variables", "latest")
    if found is None:
      raise FileNotFoundError(
          f"no averaged checkpoint in {stage_dir / AVERAGE_DIR} (the training stage writes one when "
          "checkpoint.average_from > 0; or read 'best' or 'latest')")
    return found
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
