"""The run skeleton shared by the training stages `cls` and `seg`.

A stage reads its data, builds its model, loss, data stream, validator and pretrained-weights hook,
and hands them to `train_stage` as `StageParts`; `train_stage` does the rest the same way for both:
writes the network card (`artifacts.write_network_card`: what later stages rebuild the network
from), initialises through the model's `init`, freezes what the stage asks (`models.trainable_mask`),
builds the optimiser from `config.train` (`optim.optimizer_from_config`), the finite data iterator,
the mesh and the validator (or warns that there are no validation images), and runs
`train.train_loop` with `train.LoopOptions.from_config`. Also here: the TensorBoard panels both
validators draw.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from oeem_jax.engine import train
from oeem_jax.engine.optim import optimizer_from_config
from oeem_jax.engine.parallel import make_mesh

if TYPE_CHECKING:  # annotations only: importing this module needs no ml_collections
  import ml_collections


@dataclasses.dataclass(frozen=True)
class StageParts:
  """What a training stage hands to `train_stage`.

  Attributes:
    name: the stage ("cls" or "seg"): label of the log lines.
    model: the flax module; initialised as `model.init({"params", "dropout"}, zeros[1, S, S, 3],
      train=False)` with S = `input_size`.
    input_size: side S (pixels) of the dummy input that initialises the model.
    loss_fn: `train.Task.loss_fn`.
    dataset: start_step -> tf.data.Dataset of this process's rows of batches start_step, ... (a
      pure function of the step); `train_stage` takes as many as the run still needs.
    pretrained: `train.Task.pretrained` hook, or None.
    freeze: keyword arguments of `models.trainable_mask` (besides the params) when some parameters
      stay fixed, or None (everything trains).
    val_examples: the validation `Example`s (may be empty: no evaluation, no best checkpoint).
    make_validator: (mesh) -> `train.Task.eval_fn` on `val_examples`; called only when there are
      some.
    best_metric: key of the validator's metrics that decides the best checkpoint.
    identity: the run's identity (`checkpoint.run_identity` plus what the stage adds).
  """
  name: str
  model: Any
  input_size: int
  loss_fn: train.LossFn
  dataset: Callable[[int], Any]
  pretrained: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None
  freeze: Mapping[str, Any] | None
  val_examples: Sequence[Any]
  make_validator: Callable[[Any], Callable[[Any, int], train.EvalResult]]
  best_metric: str
  identity: Mapping[str, Any]


def train_stage(config: ml_collections.ConfigDict, stage_dir: Path, parts: StageParts,
                steps: int) -> dict[str, Any]:
  """Trains `parts` for `steps` updates in `stage_dir` (module docstring).

  Returns:
    the summary fields of `train.train_loop`.

  Raises:
    everything `train.train_loop` raises (`errors.NonFiniteLossError`, `train.Preempted`,
    ValueError / errors.ConfigError for bad values or a resume of another run).
  """
  model, size = parts.model, int(parts.input_size)
  if jax.process_index() == 0:  # one writer on a shared filesystem
    from oeem_jax.models import factory
    from oeem_jax.models.network import config_input_stats as input_stats
    from oeem_jax.runtime import artifacts
    artifacts.write_network_card(stage_dir, factory.network_card(
        model, input_kind=parts.name, input_stats=input_stats(config), input_size=size))

  def init_variables(rng):
    return model.init({"params": rng, "dropout": rng}, jnp.zeros((1, size, size, 3)), train=False)

  mask = None
  if parts.freeze is not None:
    from oeem_jax.models import trainable_mask
    abstract = jax.eval_shape(init_variables, jax.random.PRNGKey(0))
    mask = trainable_mask(abstract["params"], **parts.freeze)
  tx, schedule = optimizer_from_config(config.train, steps, trainable_mask=mask)

  def make_iterator(start_step):
    # Finite: nothing is left in flight when training ends (tearing down a busy tf.data pipeline
    # can take tens of seconds).
    return parts.dataset(start_step).take(max(steps - start_step, 0)).as_numpy_iterator()

  mesh = make_mesh()
  validator = None
  if parts.val_examples:
    validator = parts.make_validator(mesh)
  else:
    logging.warning("%s: no validation images (data.val_count = 0): no evaluation, no best "
                    "checkpoint", parts.name)
  task = train.Task(init_variables=init_variables, loss_fn=parts.loss_fn,
                    make_iterator=make_iterator, tx=tx, schedule=schedule,
                    pretrained=parts.pretrained, eval_fn=validator)
  options = train.LoopOptions.from_config(config, steps, name=parts.name,
                                          best_metric=parts.best_metric if validator else None)
  result = train.train_loop(stage_dir, task, options, mesh=mesh, run_identity=parts.identity)
  average_from = int(config.checkpoint.get("average_from", 0) or 0)
  if average_from > 0:
    from oeem_jax.config.check import averaged_steps
    chosen = averaged_steps(int(config.checkpoint.every), steps, average_from)
    result["average"] = write_average(stage_dir, parts.name, chosen, validator, mesh)
  return result


def write_average(stage_dir: Path, name: str, steps: Sequence[int],
                  validator: Callable[[Any, int], train.EvalResult] | None, mesh) -> dict[str, Any]:
  """Averages the periodic checkpoints of `steps` (ascending; `checkpoint.average_checkpoints`),
  scores the average on validation and writes it to `<stage_dir>/average/<last step>/`.

  Returns:
    {"steps": the averaged steps, "eval": validation metrics of the average ({} without
    validation images), "params_digest"}.

  Raises:
    FileNotFoundError: a step without its periodic checkpoint.
  """
  from oeem_jax.engine import checkpoint

  steps = list(steps)
  variables = checkpoint.average_checkpoints(stage_dir, steps)
  metrics = {}
  if validator is not None:
    replicated = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    metrics = {k: float(v) for k, v in validator(replicated, steps[-1]).metrics.items()}
  if jax.process_index() == 0:
    checkpoint.save_average(stage_dir, steps[-1], variables, metrics)
  shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items() if "miou" in k)
  logging.info("%s: averaged the checkpoints of steps %s%s", name, ", ".join(map(str, steps)),
               f": validation {shown}" if shown else "")
  return {"steps": steps, "eval": metrics,
          "params_digest": checkpoint.params_digest(variables["params"])}


def summary_line(head: str, result: Mapping[str, Any], label: str, metric: str) -> str:
  """`<head>: <steps> steps, final train loss <x>[; val <label> <final> (best <best> at step <s>)]`
  from `train_loop`'s result; metric values (fractions) are printed in percent."""
  line = (f"{head}: {result['steps']} steps, final train loss "
          f"{result['final_train'].get('loss', float('nan')):.4f}")
  fe, best = result["final_eval"], result["best_eval"]
  if fe:
    line += (f"; val {label} {100 * fe[metric]:.2f} (best {100 * best[metric]:.2f} at step "
             f"{best['step']})")
  return line


def average_note(result: Mapping[str, Any], label: str, metric: str) -> str:
  """`; average of steps <first>-<last> (<n>): val <label> <x>` when the run averaged its
  checkpoints (`write_average`), else ""."""
  avg = result.get("average")
  if not avg:
    return ""
  steps = avg["steps"]
  note = f"; average of steps {steps[0]}-{steps[-1]} ({len(steps)})"
  if metric in avg["eval"]:
    note += f": val {label} {100 * avg['eval'][metric]:.2f}"
  return note


def colour_mask(mask: np.ndarray) -> np.ndarray:
  """[H, W] mask (gland = value > 0) -> uint8[H, W, 3] (gland white, background black)."""
  return np.repeat((mask > 0).astype(np.uint8)[..., None] * 255, 3, axis=-1)


def panel(*parts: np.ndarray, scale: int = 2) -> np.ndarray:
  """Side-by-side uint8[H, W, 3] images, subsampled by `scale` -> uint8[1, H/scale, k*W/scale, 3]."""
  return np.concatenate([p[::scale, ::scale] for p in parts], axis=1)[None]
