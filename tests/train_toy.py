"""A toy model and toy data for the training-engine tests (tests/test_train.py).

Run as a script it trains the toy in a subprocess, so tests can use fake CPU devices (XLA flags must
be set before JAX is imported) and kill the process:

    python tests/train_toy.py --workdir=DIR --steps=12 [--devices=4] [--kill_at=7] [--nan_at=9]
        [--sigterm_at=5] [--stop_at=3] [--every=3] [--out=result.json]

The result (summary fields of `train_loop`, plus flat float64 params for cross-run comparisons) is
written as JSON to --out.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def toy_batch(seed: int, step: int, batch_size: int, nan: bool = False):
  """Batch `step` of the toy task: a pure function of (seed, step).

  Returns {"image": float32[B, 8, 8, 3], "label": float32[B, 2]}; label = [mean(red) > 0,
  mean(green) > 0] of a noisy image whose red/green channel means carry the label.
  """
  import numpy as np
  rng = np.random.default_rng([seed, step])
  label = rng.integers(0, 2, size=(batch_size, 2)).astype(np.float32)
  image = rng.normal(0.0, 0.5, size=(batch_size, 8, 8, 3)).astype(np.float32)
  image[..., 0] += (2 * label[:, 0] - 1)[:, None, None]
  image[..., 1] += (2 * label[:, 1] - 1)[:, None, None]
  if nan:
    image[0, 0, 0, 0] = np.nan
  return {"image": image, "label": label}


class StopToy(Exception):
  """Raised by the step hook at `stop_at` (after that step's checkpoint was started)."""


def make_model():
  import flax.linen as nn

  class Toy(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Dropout -> global pool -> Dense(2)."""

    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Conv(8, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
      x = nn.Dropout(0.2, broadcast_dims=(1, 2), deterministic=not train)(x)
      return nn.Dense(2)(x.mean(axis=(1, 2)))

  return Toy()


def run(workdir: str, steps: int, *, batch_size: int = 8, seed: int = 0, every: int = 3, keep: int = 2,
        lr: float = 0.3, nan_at: int | None = None, kill_at: int | None = None,
        sigterm_at: int | None = None, eval_every: int = 0, async_checkpoint: bool = True,
        num_devices: int | None = None, tensorboard: bool = False, stop_at: int | None = None,
        pretrained=None, trainable_mask=None, identity=None):
  """Trains the toy with `oeem_jax.engine.train.train_loop`; returns its result dict."""
  import jax
  import jax.numpy as jnp
  import optax

  from oeem_jax.engine import train
  from oeem_jax.engine.optim import make_optimizer
  from oeem_jax.engine.parallel import make_mesh

  model = make_model()

  def init_variables(rng):
    return model.init({"params": rng}, jnp.zeros((1, 8, 8, 3)), train=False)

  def loss_fn(params, batch_stats, batch, rng):
    logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                              train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    loss = optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean()
    return loss, (upd["batch_stats"], {"acc": ((logits > 0) == (batch["label"] > 0.5)).mean()})

  def make_iterator(start):
    step = start
    while True:
      yield toy_batch(seed, step, batch_size, nan=(step == nan_at))
      step += 1

  def eval_fn(variables, step):
    b = toy_batch(seed + 1000, 0, 16)
    logits = model.apply(variables, b["image"], train=False)
    acc = float(((logits > 0) == (b["label"] > 0.5)).mean())
    # "peak" is best (largest) at step 8: lets tests check which evaluation the best/ folder keeps.
    return train.EvalResult({"acc": acc, "peak": -abs(float(step) - 8.0)})

  def hook(step):
    print(f"STEP {step}", flush=True)
    if kill_at is not None and step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    if sigterm_at is not None and step == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    if stop_at is not None and step == stop_at:
      raise StopToy(step)

  tx, schedule = make_optimizer(lr, steps, weight_decay=1e-4, trainable_mask=trainable_mask)
  task = train.Task(init_variables=init_variables, loss_fn=loss_fn, make_iterator=make_iterator,
                    tx=tx, schedule=schedule, pretrained=pretrained,
                    eval_fn=eval_fn if eval_every else None)
  options = train.LoopOptions(total_steps=steps, seed=seed, checkpoint_every=every, keep=keep,
                              log_every=2, eval_every=eval_every,
                              best_metric="peak" if eval_every else None, name="toy",
                              async_checkpoint=async_checkpoint, tensorboard=tensorboard)
  return train.train_loop(workdir, task, options, run_identity=identity, step_hook=hook,
                          mesh=make_mesh(jax.devices()[:num_devices]) if num_devices else None)


def overfit_stages(workdir: str, steps: int = 30, lr: float = 0.05) -> dict:
  """Overfits the real stage models and losses on one fixed synthetic batch; returns, per stage,
  `train_loop`'s first_loss and final_train.

  cls: `CAMClassifier(width=1/32)` on four 32x32 images with multi-hot labels, `stages.cls.make_loss_fn`.
  seg: `PSPNet(width=1/32)` on four 32x32 crops of a bright disc (rows 0-3 of one crop labelled 255),
  `stages.seg.make_loss_fn` with the OEEM loss and the 0.4 auxiliary head.
  """
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from oeem_jax.engine import train
  from oeem_jax.engine.optim import make_optimizer
  from oeem_jax.models import CAMClassifier, PSPNet
  from oeem_jax.stages import cls as cls_stage
  from oeem_jax.stages import seg as seg_stage

  size = 32
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  colour = np.array([1.0, -1.0, 0.5], np.float32)
  images, masks = [], []
  for _ in range(4):
    cy, cx, r = rng.integers(8, 24), rng.integers(8, 24), rng.integers(5, 10)
    m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.int32)
    images.append(rng.normal(0, 0.3, (size, size, 3)).astype(np.float32) + m[..., None] * colour)
    masks.append(m)
  images, masks = np.stack(images), np.stack(masks)
  cls_images = images.copy()
  cls_images[1] += colour  # all gland
  cls_images[2] = rng.normal(0, 0.3, (size, size, 3))  # no gland
  masks[0, :4] = 255
  tasks = {
      "cls": (CAMClassifier(width=1 / 32), cls_stage.make_loss_fn,
              {"image": cls_images, "label": np.array([[1, 1], [0, 1], [1, 0], [1, 1]], np.float32)}),
      "seg": (PSPNet(width=1 / 32),
              lambda m: seg_stage.make_loss_fn(m, ml_collections.ConfigDict(
                  {"loss_kind": "oeem", "aux_weight": 0.4})),
              {"image": images, "mask": masks}),
  }
  out = {}
  for name, (model, make_loss, batch) in tasks.items():
    def init(rng, model=model):
      return model.init({"params": rng, "dropout": rng}, jnp.zeros((1, size, size, 3)), train=False)

    def iterator(start, batch=batch):
      del start
      while True:
        yield batch

    tx, schedule = make_optimizer(lr, steps, weight_decay=1e-4)
    task = train.Task(init_variables=init, loss_fn=make_loss(model), make_iterator=iterator, tx=tx,
                      schedule=schedule)
    options = train.LoopOptions(total_steps=steps, seed=0, checkpoint_every=0, log_every=5,
                                tensorboard=False, name=name)
    r = train.train_loop(os.path.join(workdir, name), task, options)
    out[name] = {"first_loss": r["first_loss"], "final_train": r["final_train"],
                 "num_devices": r["num_devices"]}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", type=int, required=True)
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--every", type=int, default=3)
  p.add_argument("--kill_at", type=int)
  p.add_argument("--nan_at", type=int)
  p.add_argument("--sigterm_at", type=int)
  p.add_argument("--stop_at", type=int, help="stop after this step (its checkpoint is completed)")
  p.add_argument("--eval_every", type=int, default=0)
  p.add_argument("--overfit_stages", action="store_true",
                 help="also overfit the cls and seg models (tests/test_train.py)")
  p.add_argument("--out")
  args = p.parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np
  assert jax.device_count() == args.devices, jax.devices()
  try:
    result = run(args.workdir, args.steps, batch_size=args.batch_size, every=args.every,
                 kill_at=args.kill_at, nan_at=args.nan_at, sigterm_at=args.sigterm_at,
                 eval_every=args.eval_every, stop_at=args.stop_at)
  except StopToy as stop:
    result = {"stopped_at": stop.args[0], "num_devices": jax.device_count()}
  if args.overfit_stages:
    result["stages"] = overfit_stages(os.path.join(args.workdir, "stages"))
  if args.out:
    from oeem_jax.engine.checkpoint import load_variables
    from oeem_jax.runtime import io_utils
    variables, result["checkpoint_step"] = load_variables(args.workdir, "latest")
    flat = [np.asarray(x, np.float64).ravel().tolist() for x in jax.tree.leaves(variables["params"])]
    result["flat_params"] = flat
    io_utils.atomic_write_json(args.out, result)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
