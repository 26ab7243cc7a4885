"""Benchmark: loss + gradient time of every loss kind, relative to plain CE and to a PSPNet train step.

Prints, per batch shape [N, H, W, C] and kind: the median wall time of one jitted
`value_and_grad(segmentation_loss)` w.r.t. the logits, its ratio to kind "ce", and (when
oeem_jax.models.pspnet is importable) its share of one jitted PSPNet train step at the same batch
(forward + backward + SGD update, both heads with the CE loss). The trainer calls the loss twice per
step (decode head + auxiliary head), so the share column counts two calls.

Usage (from the repo root):
  python launch/bench_loss.py                                   # all kinds, N = 8 and 32, PSPNet w=0.25
  python launch/bench_loss.py --kinds=ce,oeem --no-pspnet       # loss timings only
  python launch/bench_loss.py --batches=8 --pspnet_repeats=3
  python launch/bench_loss.py --no-pspnet --clock=cpu           # CPU time: steadier on a busy machine

Labels: random {0, 1} with a 32-pixel padded strip (255) on every other image and one single-class
image in four, so the ignore and Eq. 8 paths are exercised. Timings are wall clock on whatever
device JAX picks; on a shared CPU they are noisy, so read the ratios rather than the absolute figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from oeem_jax.method import losses

CLOCK = time.perf_counter


def _median_times(fns: dict, *args, repeats: int) -> dict[str, float]:
  """Median time of each fn(*args) on CLOCK; the fns are interleaved round-robin so that load drifts
  on a shared machine hit every kind alike."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))  # compile + warm up
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = CLOCK()
      jax.block_until_ready(fn(*args))
      times[name].append(CLOCK() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def make_batch(n: int, h: int, w: int, c: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Random float32 logits [n, h, w, c] and int32 labels [n, h, w] with padding and single-class images."""
  rng = np.random.default_rng(seed)
  logits = (2.0 * rng.standard_normal((n, h, w, c))).astype(np.float32)
  labels = rng.integers(0, c, (n, h, w)).astype(np.int32)
  labels[1::2, :, w - 32:] = 255
  labels[3::4] = np.where(labels[3::4] == 255, 255, 1)
  return jnp.asarray(logits), jnp.asarray(labels)


def loss_and_grad_fn(kind: str):
  return jax.jit(jax.value_and_grad(lambda z, y: losses.segmentation_loss(z, y, kind=kind)))


def pspnet_step_fn(n: int, h: int, w: int, c: int, width: float):
  """A jitted PSPNet train step (CE on both heads, aux weight 0.4) and its initial arguments, or None."""
  try:
    from oeem_jax.models.pspnet import PSPNet
  except ImportError:
    return None
  import optax

  model = PSPNet(width=width, num_classes=c)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((n, h, w, 3)), jnp.float32)
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x[:1], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.sgd(5e-3, momentum=0.9)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y, key):
    def loss_fn(p):
      (logits, aux), new_vars = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                            rngs={"dropout": key}, mutable=["batch_stats"])
      loss = losses.segmentation_loss(logits, y, kind="ce") + 0.4 * losses.segmentation_loss(aux, y, kind="ce")
      return loss, new_vars["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, new_opt = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, new_opt, loss

  return step, (params, batch_stats, opt_state, x)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", default="8,32", help="comma-separated batch sizes N")
  parser.add_argument("--size", type=int, default=256, help="crop side H = W in pixels")
  parser.add_argument("--classes", type=int, default=2)
  parser.add_argument("--kinds", default=",".join(losses.KINDS))
  parser.add_argument("--repeats", type=int, default=20, help="timed loss calls per kind (median)")
  parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                      help="wall: elapsed time; cpu: this process's CPU time over all threads (less "
                           "sensitive to other jobs on a shared CPU machine; meaningless on GPU)")
  parser.add_argument("--pspnet", action=argparse.BooleanOptionalAction, default=True,
                      help="also time one PSPNet train step per batch size")
  parser.add_argument("--pspnet_width", type=float, default=0.25)
  parser.add_argument("--pspnet_repeats", type=int, default=3)
  args = parser.parse_args()

  global CLOCK
  CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
  kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
  for k in kinds:
    if k not in losses.KINDS:
      parser.error(f"--kinds: unknown kind {k!r}; expected some of {losses.KINDS}")
  if "ce" not in kinds:
    kinds.insert(0, "ce")
  print(f"backend={jax.default_backend()} devices={jax.devices()} repeats={args.repeats} clock={args.clock}")

  h = w = args.size
  for n in [int(b) for b in args.batches.split(",")]:
    z, y = make_batch(n, h, w, args.classes)
    step_time = None
    if args.pspnet:
      built = pspnet_step_fn(n, h, w, args.classes, args.pspnet_width)
      if built is None:
        print("PSPNet not available yet (oeem_jax.models.pspnet missing); skipping the train-step ratio")
      else:
        step, (params, stats, opt_state, x) = built
        step_time = _median_times({"step": lambda: step(params, stats, opt_state, x, y, jax.random.key(2))},
                                  repeats=args.pspnet_repeats)["step"]
        print(f"[{n},{h},{w},{args.classes}] PSPNet(width={args.pspnet_width}) train step: "
              f"{step_time * 1e3:.1f} ms (median of {args.pspnet_repeats})")
    times = _median_times({k: loss_and_grad_fn(k) for k in kinds}, z, y, repeats=args.repeats)
    header = f"{'kind':8s} {'loss+grad ms':>12s} {'x ce':>6s}"  # ms of args.clock
    if step_time is not None:
      header += f" {'% of step (2 heads)':>20s}"
    print(f"[{n},{h},{w},{args.classes}]\n{header}")
    for k in kinds:
      line = f"{k:8s} {times[k] * 1e3:12.2f} {times[k] / times['ce']:6.2f}"
      if step_time is not None:
        line += f" {200.0 * times[k] / step_time:19.2f}%"
      print(line)


if __name__ == "__main__":
  main()
