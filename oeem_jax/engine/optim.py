"""The optimiser: SGD with momentum, L2 weight decay and a poly schedule, plus frozen parameters.

`make_optimizer` is what the cls and seg stages train with (`optimizer_from_config` reads it from a
config's `train` section); `mask_frozen` gives frozen leaves a zero update and no optimiser state
(which leaves are frozen is `oeem_jax.models.trainable_mask`'s business).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

PyTree = Any


def mask_frozen(tx: optax.GradientTransformation, trainable_mask: PyTree
                ) -> optax.GradientTransformation:
  """Wraps `tx` so the leaves whose `trainable_mask` entry is False get an exactly zero update.

  Weight decay or momentum inside `tx` never touches the frozen leaves (they get no state in `tx`).

  Args:
    tx: the transformation of the trainable leaves.
    trainable_mask: pytree of bools with the structure of the params (True = trainable).

  Returns:
    An `optax.partition` of `tx` (trainable) and `optax.set_to_zero()` (frozen).
  """
  labels = jax.tree.map(lambda m: "train" if bool(m) else "frozen", trainable_mask)
  return optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)


def make_optimizer(lr: float, total_steps: int, *, momentum: float = 0.9, weight_decay: float = 0.0,
                   power: float = 0.9, end_lr: float = 0.0,
                   trainable_mask: PyTree | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum, L2 weight decay added to the gradient, and a polynomial ("poly") schedule.

  Implements PyTorch `torch.optim.SGD(lr, momentum, weight_decay)` semantics, the optimiser of the
  paper's segmenter: `g += weight_decay * p; buf = momentum * buf + g; p -= lr_t * buf` (first
  step `buf = g`), with `lr_t = (lr - end_lr) * (1 - t / total_steps) ** power + end_lr` for update
  `t = 0 .. total_steps-1` (mmseg's poly policy with `min_lr = end_lr`). The reference classifier
  script's optimiser bug (weight decay passed as momentum, learning rate frozen after 20
  iterations) is deliberately NOT reproduced.

  Args:
    lr: base learning rate (> 0).
    total_steps: number of updates of the run (> 0); the schedule reaches `end_lr` there.
    momentum: heavy-ball momentum (PyTorch `momentum`, no dampening, no Nesterov).
    weight_decay: L2 coefficient added to the gradient (applies to every trainable parameter).
    power: poly exponent.
    end_lr: floor of the schedule (learning rate at and after `total_steps`).
    trainable_mask: optional pytree of bools with the structure of the params; `False` leaves get a
      zero update (frozen: no decay, no momentum; `mask_frozen`).

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
    tx = mask_frozen(tx, trainable_mask)
  return tx, schedule


def optimizer_from_config(train_cfg, total_steps: int, trainable_mask: PyTree | None = None
                          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`make_optimizer` from a config's `train` section (keys lr, momentum, weight_decay, power,
  end_lr); see there for the arguments, return value and errors."""
  return make_optimizer(float(train_cfg.lr), total_steps, momentum=float(train_cfg.momentum),
                        weight_decay=float(train_cfg.weight_decay), power=float(train_cfg.power),
                        end_lr=float(train_cfg.end_lr), trainable_mask=trainable_mask)
