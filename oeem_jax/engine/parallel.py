"""Devices and hosts: multi-process set-up, the 1-D data mesh, and placing arrays on it.

One 1-D `jax.sharding.Mesh` over every device of every process, axis name `"data"`. Batches are
sharded along their leading axis with `NamedSharding(mesh, P("data"))`; the train state is
replicated (`P()`). Each process feeds only its own rows through
`jax.make_array_from_process_local_data`. Multi-host runs call `jax.distributed.initialize()` first
(`setup_distributed`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
Batch = Mapping[str, np.ndarray]

DATA_AXIS = "data"


def setup_distributed(mode: str | bool = "auto") -> bool:
  """Calls `jax.distributed.initialize()` when asked; returns whether JAX runs multi-process.

  Call it before anything touches a JAX device. Modes (config key `train.distributed`):
    * "auto" (default): initialise when `$JAX_COORDINATOR_ADDRESS` is set or `$OEEM_DISTRIBUTED=1`;
    * "on" / True: always initialise (JAX auto-detects TPU pods, SLURM, Open MPI, Kubernetes);
    * "off" / False: never.
  `$JAX_COORDINATOR_ADDRESS` (host:port of process 0), `$JAX_NUM_PROCESSES` and `$JAX_PROCESS_ID`
  are passed on when set (what launch/train_multihost.sh exports). Idempotent.

  Raises:
    errors.ConfigError (a ValueError): unknown mode.
  """
  mode = {True: "on", False: "off"}.get(mode, mode)
  if mode not in ("auto", "on", "off"):
    from oeem_jax.errors import ConfigError
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


def round_to_mesh(batch_size: int, mesh: Mesh) -> int:
  """`batch_size` (rows) rounded up to a multiple of the mesh's device count, so that a batch of
  that many rows shards evenly over "data" (evaluation batches are padded to this size)."""
  return -(-int(batch_size) // mesh.size) * mesh.size


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a pytree of host/device arrays replicated on every device of `mesh` (multi-host safe:
  every process must pass the same values). Shapes and dtypes are kept."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, tree)


def shard_batch(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded along axis 0 over the "data" axis.

  Args:
    batch: dict of arrays [B_local, ...]; every process passes its own B_local rows, in process order.

  Returns:
    dict of global arrays [B_local * process_count, ...], same dtypes.

  Raises:
    errors.ConfigError (a ValueError): the global batch is not divisible by the number of
      devices (names config key train.batch_size).
  """
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    global_rows = value.shape[0] * jax.process_count()
    if global_rows % mesh.size:
      from oeem_jax.errors import ConfigError
      raise ConfigError("train.batch_size", str(global_rows),
                        f"a multiple of the {mesh.size} devices of the mesh (batch[{key!r}])")
    sharding = NamedSharding(mesh, P(DATA_AXIS, *([None] * (value.ndim - 1))))
    out[key] = jax.make_array_from_process_local_data(sharding, value,
                                                      (global_rows,) + value.shape[1:])
  return out


def shard_global(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array that every process holds in full -> global array sharded over "data" (axis 0).

  For evaluation inputs (each process computes the same list). Axis 0 must be divisible by the
  mesh size (`round_to_mesh`); shape and dtype are kept.
  """
  x = np.asarray(x)
  sharding = NamedSharding(mesh, P(DATA_AXIS, *([None] * (x.ndim - 1))))
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def padded_batches(arrays: Sequence[np.ndarray], batch_size: int
                   ) -> Iterator[tuple[int, list[np.ndarray]]]:
  """Splits equally long arrays into fixed-size batches along axis 0, the last one zero-padded.

  Args:
    arrays: NumPy arrays [N, ...] (same N).
    batch_size: rows per batch (>= 1).

  Yields:
    (k, batch arrays [batch_size, ...] of the input dtypes): rows 0..k-1 are real, the rest zeros.
  """
  n = len(arrays[0])
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    k = len(chunk[0])
    if k < batch_size:
      chunk = [np.concatenate([c, np.zeros((batch_size - k,) + c.shape[1:], c.dtype)]) for c in chunk]
    yield k, chunk


class BatchedApply:
  """A jitted evaluation function applied in fixed-size batches sharded over the "data" axis.

  Every call has the same shapes, so `fn` compiles once; its outputs are gathered replicated.

  Args:
    fn: (variables, *inputs [batch, ...]) -> an array or a tuple of arrays with leading axis batch.
    mesh: device mesh.
    batch_size: rows per call, rounded up to a multiple of the device count (`round_to_mesh`).
  """

  def __init__(self, fn: Callable, mesh: Mesh, batch_size: int):
    self.mesh = mesh
    self.batch = round_to_mesh(batch_size, mesh)
    self._fn = jax.jit(fn, out_shardings=NamedSharding(mesh, P()))

  def __call__(self, variables: PyTree, *inputs: np.ndarray):
    """`fn` on one batch of exactly `self.batch` rows per input (host arrays); device outputs."""
    return self._fn(variables, *(shard_global(x, self.mesh) for x in inputs))

  def map(self, variables: PyTree, *arrays: np.ndarray) -> list[np.ndarray]:
    """`fn` over every row of `arrays` ([N, ...] each, N >= 1; the last batch is padded), for an
    `fn` returning a tuple: one NumPy array [N, ...] per output."""
    outs = [(k, self(variables, *chunk)) for k, chunk in padded_batches(arrays, self.batch)]
    return [np.concatenate([np.asarray(o[i])[:k] for k, o in outs]) for i in range(len(outs[0][1]))]
