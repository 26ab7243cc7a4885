r"""One-call speed check of the paper configuration on an accelerator (issue 15); also runs on CPU.

    python3 launch/accelerator_check.py --out=check.json          # one GPU, ~5-8 min
    python3 launch/accelerator_check.py --tiny --out=tiny.json     # CPU smoke test (tests/test_accelerator_check.py)

Needs only jax, flax, optax, orbax-checkpoint, absl-py, numpy and scipy (what the GPU image has):
nothing on its import path touches tensorflow, tensorflow-datasets, ml_collections, clu or torch,
and no wheel has to travel with the working tree. Prints its figures and writes them to `--out`
(JSON, rewritten after every part, so a run cut short keeps what it measured).

Parts, in this order (`--parts` picks some):

* `matmul` - the device's bf16 matmul peak: `a @ b` on bf16[n, n], n = 8192, 2 n^3 FLOPs per call,
  mean over 10 calls dispatched back to back after 3 warm-up calls.
* `cls`, `seg` - the training step `train.make_step_fn` builds (what `train.train_loop` jits),
  for each `--dtypes` entry (compute dtype; parameters, BN statistics and losses stay float32):
    cls: CAMClassifier (ResNet-38d width 1, B7 dilation 2) in reference mode (BN on running
         statistics, conv1a and BN gamma/beta frozen by the optimizer mask), batch 20 of 224^2,
         BCE with logits (`stages.cls.make_loss_fn`), SGD momentum 0.9, lr 0.01 poly;
    seg: PSPNet (ResNet-38d width 1, B7 dilation 4), BN training, batch 32 of 256^2, OEEM loss +
         0.4 x the auxiliary head's (`stages.seg.make_loss_fn`), SGD momentum 0.9, weight decay 5e-4,
         lr 5e-3 poly to 1e-4.
  Per configuration: trace + lowering time, compile time, median and min step time over `--steps`
  steps (each blocked on, after `--warmup` steps), XLA FLOPs per step (`Compiled.cost_analysis()`;
  that of the lowered module too), achieved TFLOP/s (FLOPs / median step), the fraction of the
  measured matmul peak, peak device memory (XLA's buffer assignment from `memory_analysis()`, and
  `Device.memory_stats()["peak_bytes_in_use"]`, the process's peak so far, where the backend keeps
  it - GPU/TPU, not CPU), and the dtypes of the convolutions and dots (`launch/hlo_census.py`) in the
  lowered and in the compiled module.
* `loop` - a real `train.train_loop` run of the seg step (`--loop_dtype`) for `--loop_steps` steps on an
  in-memory synthetic batch stream (4 fixed batches, batch s = s mod 4) with orbax checkpoints at
  half-way and at the end; then `train_loop` again in the same folder, which restores the newest
  checkpoint onto the device (0 steps to run) - its `params_digest` must equal the first run's; then the
  end checkpoint is deleted and `train_loop` resumes from half-way to the end: `resume_bit_identical`
  says whether that replays the same parameters bit for bit (it does on CPU; tests/test_train.py).
  The steps reuse the `seg` part's executable through JAX's persistent compilation cache (same HLO).
* `projection` (always, from what was measured) - wall time of the paper pipeline's two training
  stages: cls 20 epochs x 9,703 tiles / batch 20 = 9,703 steps, seg 10,000 steps, x the median
  step time, per dtype, against the target: the whole paper pipeline in < 15 min on one H200, which
  needs about cls <= 30 ms and seg <= 50 ms per step; when a step misses its target, what stands in
  the way (FLOPs above what the measured peak allows, or kernel efficiency), and the host input rate
  (tiles/s, crops/s) the measured step times would need (launch/bench_data.py measures the host's).
  CAM generation and evaluation are not timed here.

`--tiny`: CPU-sized shapes (ResNet38 width 0.125, batch 2 of 32^2, 3 timed steps, a 256^3 matmul,
6 loop steps), XLA's backend optimisation level 0 and plain XLA convolution gradients (`--conv_impl=xla`,
what GPUs run; both compile faster); its figures only show that every part runs, and the projection
it prints means nothing.

Exit status: 0 when every part ran, 1 when one failed (its error is in the JSON), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# hlo_census.py lies beside this script (development code, not part of the package); `python3
# launch/accelerator_check.py` puts this folder on sys.path already, runpy and importers do not.
sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = ("matmul", "cls", "seg", "loop")
DTYPES = ("float32", "bfloat16")

# The paper configuration (configs/cls.py and configs/seg_oeem.py defaults, reference mode for cls;
# tests/test_accelerator_check.py compares these with the configs).
PAPER = {
    "width": 1.0,
    "cls": {"batch": 20, "size": 224, "steps": 9_703, "lr": 0.01, "end_lr": 0.0, "weight_decay": 0.0,
            "b7_dilation": 2},
    "seg": {"batch": 32, "size": 256, "steps": 10_000, "lr": 5e-3, "end_lr": 1e-4,
            "weight_decay": 5e-4, "b7_dilation": 4, "aux_weight": 0.4, "loss_kind": "oeem"},
    "momentum": 0.9,
    "power": 0.9,
}
TARGET_TOTAL_S = 15 * 60
TARGET_STEP_S = {"cls": 0.030, "seg": 0.050}
FULL = {"matmul_n": 8192, "steps": 20, "warmup": 2, "loop_steps": 200, "budget_s": 480.0}
TINY = {"width": 0.125, "size": 32, "batch": 2, "matmul_n": 256, "steps": 3, "warmup": 1,
        "loop_steps": 6}
LOOP_BATCHES = 4  # distinct synthetic batches the loop cycles through


# ---------------------------------------------------------------------------------------------------
# Flags


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """The flags (module docstring); exits with status 2 and a message naming the flag when one is bad."""
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="accelerator_check.json", help="JSON file to write")
  ap.add_argument("--tiny", action="store_true", help="CPU-sized smoke run (module docstring)")
  ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
  ap.add_argument("--dtypes", default="bfloat16,float32",
                  help="compute dtypes of the cls/seg steps, comma list of float32, bfloat16")
  ap.add_argument("--steps", type=int, default=None,
                  help=f"timed steps per configuration (default {FULL['steps']}, tiny {TINY['steps']})")
  ap.add_argument("--warmup", type=int, default=None, help="untimed steps after compiling (default "
                  f"{FULL['warmup']}, tiny {TINY['warmup']})")
  ap.add_argument("--loop_steps", type=int, default=None,
                  help=f"train_loop steps (even; default {FULL['loop_steps']}, tiny {TINY['loop_steps']})")
  ap.add_argument("--loop_dtype", default="bfloat16", help="compute dtype of the train_loop run")
  ap.add_argument("--width", type=float, default=None, help="ResNet38 width (default 1.0, tiny 0.125)")
  ap.add_argument("--conv_impl", default=None, choices=("auto", "xla", "dots"),
                  help="convolution gradients (the networks' conv_impl); default auto (= xla on GPU/TPU), "
                       "xla with --tiny (the accelerator's code path, and faster CPU compiles)")
  ap.add_argument("--workdir", default="", help="folder for the loop's checkpoints and the compilation "
                  "cache (default: a temporary folder, deleted at the end)")
  ap.add_argument("--budget_s", type=float, default=None,
                  help="parts not started by this many seconds after the start are skipped (recorded); "
                       f"default {FULL['budget_s']:g}, none with --tiny")
  args = ap.parse_args(argv)

  args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  bad = [p for p in args.parts if p not in PARTS]
  if bad or not args.parts:
    ap.error(f"--parts: unknown part(s) {bad or args.parts!r}; expected a comma list of {', '.join(PARTS)}")
  args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  bad = [d for d in args.dtypes if d not in DTYPES]
  if bad or not args.dtypes:
    ap.error(f"--dtypes: unknown dtype(s) {bad or args.dtypes!r}; expected a comma list of {', '.join(DTYPES)}")
  if args.loop_dtype not in DTYPES:
    ap.error(f"--loop_dtype: {args.loop_dtype!r}; expected one of {', '.join(DTYPES)}")
  preset = TINY if args.tiny else FULL
  args.steps = preset["steps"] if args.steps is None else args.steps
  args.warmup = preset["warmup"] if args.warmup is None else args.warmup
  args.loop_steps = preset["loop_steps"] if args.loop_steps is None else args.loop_steps
  args.width = (TINY["width"] if args.tiny else PAPER["width"]) if args.width is None else args.width
  args.conv_impl = ("xla" if args.tiny else "auto") if args.conv_impl is None else args.conv_impl
  if args.steps < 1:
    ap.error(f"--steps must be >= 1, got {args.steps}")
  if args.warmup < 0:
    ap.error(f"--warmup must be >= 0, got {args.warmup}")
  if args.loop_steps < 2 or args.loop_steps % 2:
    ap.error(f"--loop_steps must be even and >= 2 (a checkpoint is saved half-way), got {args.loop_steps}")
  if not args.width > 0:
    ap.error(f"--width must be > 0, got {args.width}")
  if args.budget_s is not None and not args.budget_s > 0:
    ap.error(f"--budget_s must be > 0, got {args.budget_s}")
  if args.budget_s is None:
    args.budget_s = math.inf if args.tiny else FULL["budget_s"]
  return args


# ---------------------------------------------------------------------------------------------------
# Parts


def environment() -> dict[str, Any]:
  """Device kind and count, backend, jax/jaxlib and jax plugin versions, host facts."""
  import jax
  import jaxlib

  dev = jax.devices()[0]
  plugins = {}
  for dist in importlib.metadata.distributions():
    name = dist.metadata["Name"] or ""
    if name.lower().startswith(("jax-cuda", "jax_cuda", "jax-rocm", "libtpu", "jax-tpu")):
      plugins[name] = dist.version
  return {
      "device_kind": dev.device_kind, "platform": dev.platform, "num_devices": jax.device_count(),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "plugins": plugins,
      "python": platform.python_version(), "host_cpus": os.cpu_count(),
      "loadavg_at_start": list(os.getloadavg()), "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def matmul_peak(n: int, calls: int = 10, warmup: int = 3) -> dict[str, Any]:
  """Measured bf16 matmul rate: bf16[n, n] @ bf16[n, n] (2 n^3 FLOPs, bf16 result).

  `calls` products are dispatched back to back (each on the previous result's inputs, so none can be
  skipped) and waited for once; mean time = total / calls.

  Returns:
    {"n", "calls", "mean_s", "tflops"} (TFLOP/s = 1e12 FLOP/s).
  """
  import jax
  import jax.numpy as jnp

  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  mm = jax.jit(lambda x, y: x @ y)
  for _ in range(warmup):
    mm(a, b).block_until_ready()
  t0 = time.perf_counter()
  outs = [mm(a, b) for _ in range(calls)]
  jax.block_until_ready(outs)
  mean_s = (time.perf_counter() - t0) / calls
  return {"n": n, "calls": calls, "mean_s": mean_s, "tflops": 2.0 * n ** 3 / mean_s / 1e12}


class _Section(dict):
  """The few `config.seg` keys `stages.seg.make_loss_fn` reads, without ml_collections."""
  __getattr__ = dict.__getitem__


def host_variables(abstract: Any, seed: int) -> Any:
  """NumPy variables with the structure of `abstract` (from `jax.eval_shape(model.init, ...)`).

  Kernels ~ U(+-1/sqrt(fan_in)) (PyTorch's default, the backbone's own init), BN scale and running
  variance 1, every other leaf 0. Drawn on the host: nothing to compile.
  """
  import jax
  import numpy as np

  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      bound = 1.0 / math.sqrt(math.prod(s.shape[:-1]))
      return rng.uniform(-bound, bound, s.shape).astype(s.dtype)
    if name in ("scale", "var"):
      return np.ones(s.shape, s.dtype)
    return np.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def build_task(kind: str, dtype: str, *, width: float, batch: int, size: int, seed: int = 0,
               conv_impl: str = "auto") -> dict[str, Any]:
  """Model, optimiser, loss and synthetic batches of one step configuration.

  Args:
    kind: "cls" or "seg" (module docstring).
    dtype: compute dtype name ("float32" or "bfloat16").
    width: ResNet38 width; batch, size: batch x size^2 inputs.
    conv_impl: the networks' convolution gradients (`resnet38.CONV_IMPLS`).

  Returns:
    dict with model, abstract (variables' shapes), loss_fn, tx, schedule, make_batch (i ->
    dict of NumPy arrays: cls {"image": float32[B, S, S, 3], "label": float32[B, 2]}, seg
    {"image": float32[B, S, S, 3], "mask": int32[B, S, S] 0/1 with ~5 % 255}).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from oeem_jax.engine.optim import make_optimizer
  from oeem_jax.models import CAMClassifier, PSPNet, trainable_mask

  cfg = PAPER[kind]
  dt = jnp.dtype(dtype)
  if kind == "cls":
    from oeem_jax.stages.cls import make_loss_fn
    model = CAMClassifier(width=width, num_classes=2, b7_dilation=cfg["b7_dilation"], bn_frozen=True,
                          dtype=dt, conv_impl=conv_impl)
    loss_fn = make_loss_fn(model)
  else:
    from oeem_jax.stages.seg import make_loss_fn
    model = PSPNet(width=width, num_classes=2, b7_dilation=cfg["b7_dilation"], dtype=dt,
                   conv_impl=conv_impl)
    loss_fn = make_loss_fn(model, _Section(loss_kind=cfg["loss_kind"], aux_weight=cfg["aux_weight"],
                                           loss_reference_compat=False))
  abstract = jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                         jnp.zeros((1, size, size, 3), jnp.float32), train=False))
  mask = None
  if kind == "cls":  # reference mode: conv1a and every BN gamma/beta frozen
    mask = trainable_mask(abstract["params"], freeze_stem=True, freeze_bn=True)
  tx, schedule = make_optimizer(cfg["lr"], cfg["steps"], momentum=PAPER["momentum"],
                                      weight_decay=cfg["weight_decay"], power=PAPER["power"],
                                      end_lr=cfg["end_lr"], trainable_mask=mask)

  def make_batch(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, i])
    image = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
    if kind == "cls":
      return {"image": image, "label": rng.integers(0, 2, (batch, 2)).astype(np.float32)}
    m = rng.integers(0, 2, (batch, size, size)).astype(np.int32)
    m[rng.random((batch, size, size)) < 0.05] = 255
    return {"image": image, "mask": m}

  return {"model": model, "abstract": abstract, "loss_fn": loss_fn, "tx": tx, "schedule": schedule,
          "make_batch": make_batch}


def _initial_state(task: dict[str, Any], seed: int):
  import jax
  import numpy as np

  from oeem_jax.engine import train

  host = host_variables(task["abstract"], seed)
  # SGD's state starts at zero (momentum buffers, schedule count): made on the host, like the
  # parameters, instead of ~300 small device computations.
  opt_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(task["tx"].init, host["params"]))
  return train.TrainState(params=host["params"], batch_stats=host.get("batch_stats", {}),
                          opt_state=opt_state, step=np.zeros((), np.int32),
                          rng=np.asarray(jax.random.PRNGKey(seed)))


def _census(text: str) -> dict[str, Any]:
  import hlo_census  # launch/hlo_census.py, beside this script

  out = hlo_census.summarize(hlo_census.matmul_ops(text))
  out["reduce_result_dtypes"] = hlo_census.reduce_result_dtypes(text)
  return out


def _memory_stats() -> dict[str, Any] | None:
  import jax

  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def time_step(kind: str, dtype: str, *, width: float, batch: int, size: int, steps: int, warmup: int,
              peak_tflops: float | None, seed: int = 0, conv_impl: str = "auto") -> dict[str, Any]:
  """Compiles and times one step configuration (module docstring, parts `cls` / `seg`).

  Returns:
    dict: shapes, trace_lower_s, compile_s, step_s (all timed steps), median_s, min_s, flops
    (compiled; flops_lowered too), tflops (achieved), fraction_of_peak, xla_peak_bytes, memory_stats,
    hlo_lowered / hlo_compiled (hlo_census summaries), dtypes (of the state's leaves and the loss
    after the steps), final_loss.

  Raises:
    FloatingPointError: the loss after the timed steps is not finite.
  """
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from oeem_jax.engine import train
  from oeem_jax.engine.parallel import make_mesh, replicate, shard_batch

  task = build_task(kind, dtype, width=width, batch=batch, size=size, seed=seed, conv_impl=conv_impl)
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  state = replicate(_initial_state(task, seed), mesh)
  batch_dev = shard_batch(task["make_batch"](0), mesh)
  shardings = jax.tree.map(lambda _: replicated, state)
  jitted = jax.jit(train.make_step_fn(task["loss_fn"], task["tx"], task["schedule"]), donate_argnums=0,
                   out_shardings=(shardings, replicated))
  t0 = time.perf_counter()
  lowered = jitted.lower(state, batch_dev)
  trace_lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0

  def flops_of(analysis) -> float:
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float((analysis or {}).get("flops", float("nan")))

  flops = flops_of(compiled.cost_analysis())
  flops_lowered = flops_of(lowered.cost_analysis())
  ma = compiled.memory_analysis()
  xla_peak = None if ma is None else int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                                         + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
  hlo_lowered = _census(lowered.as_text(dialect="hlo"))
  hlo_compiled = _census(compiled.as_text())
  del lowered

  times = []
  metrics = None
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch_dev)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"{kind} {dtype}: loss {loss} after {warmup + steps} steps")
  dtypes = {
      "params": sorted({str(x.dtype) for x in jax.tree.leaves(state.params)}),
      "batch_stats": sorted({str(x.dtype) for x in jax.tree.leaves(state.batch_stats)}),
      "opt_state": sorted({str(x.dtype) for x in jax.tree.leaves(state.opt_state)}),
      "loss": str(metrics["loss"].dtype),
  }
  memory = _memory_stats()
  del state, batch_dev, compiled, jitted, metrics
  gc.collect()
  median = statistics.median(times)
  tflops = flops / median / 1e12 if flops > 0 else float("nan")
  return {
      "kind": kind, "dtype": dtype, "width": width, "batch": batch, "size": size,
      "trace_lower_s": trace_lower_s, "compile_s": compile_s, "steps": steps, "warmup": warmup,
      "step_s": times, "median_s": median, "min_s": min(times), "flops": flops,
      "flops_lowered": flops_lowered, "tflops": tflops,
      "fraction_of_peak": tflops / peak_tflops if peak_tflops else None,
      "xla_peak_bytes": xla_peak, "memory_stats": memory, "hlo_lowered": hlo_lowered,
      "hlo_compiled": hlo_compiled, "dtypes": dtypes, "final_loss": loss,
      "batch_dtypes": {k: str(np.asarray(v).dtype) for k, v in task["make_batch"](0).items()},
  }


def run_loop(dtype: str, *, width: float, batch: int, size: int, steps: int, workdir: Path,
             seed: int = 0, conv_impl: str = "auto") -> dict[str, Any]:
  """`train.train_loop` on the seg step: run, restore, resume (module docstring, part `loop`).

  Returns:
    dict: steps, wall_s / steps_per_s / first_loss / final_loss of the first run, params_digest,
    restored_digest (after restoring the end checkpoint onto the device), restored_matches,
    resumed_digest (after resuming from half-way), resume_bit_identical, wall times of the
    restore and resume runs, the checkpoint folder's size in bytes.
  """
  import jax
  import orbax.checkpoint as ocp

  from oeem_jax.engine import train
  from oeem_jax.engine.parallel import make_mesh

  task = build_task("seg", dtype, width=width, batch=batch, size=size, seed=seed,
                    conv_impl=conv_impl)
  batches = [task["make_batch"](i) for i in range(LOOP_BATCHES)]
  host = host_variables(task["abstract"], seed)
  zeros = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), task["abstract"])
  stage_dir = workdir / "loop"

  def make_iterator(start_step: int):
    return (batches[s % LOOP_BATCHES] for s in range(start_step, steps))

  def loop() -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    loop_task = train.Task(init_variables=lambda rng: zeros, pretrained=lambda _: host,
                           loss_fn=task["loss_fn"], make_iterator=make_iterator, tx=task["tx"],
                           schedule=task["schedule"])
    options = train.LoopOptions(total_steps=steps, seed=seed, checkpoint_every=steps // 2, keep=2,
                                log_every=max(1, steps // 4), async_checkpoint=True, name="check",
                                tensorboard=False)
    out = train.train_loop(stage_dir, loop_task, options, mesh=make_mesh(), run_identity={
        "check": "accelerator", "dtype": dtype, "width": width, "batch": batch, "size": size,
        "steps": steps})
    return out, time.perf_counter() - t0

  first, wall = loop()
  restored, restore_wall = loop()  # newest checkpoint (the end) restored onto the device, 0 steps
  with ocp.CheckpointManager((stage_dir / "checkpoints").absolute()) as mngr:
    mngr.delete(steps)
  resumed, resume_wall = loop()  # from the half-way checkpoint to the end
  ckpt_bytes = sum(f.stat().st_size for f in (stage_dir / "checkpoints").rglob("*") if f.is_file())
  return {
      "dtype": dtype, "width": width, "batch": batch, "size": size, "steps": first["steps"],
      "wall_s": wall, "train_time_s": first["train_time_s"], "steps_per_s": first["steps_per_s"],
      "first_loss": first["first_loss"], "final_loss": first["final_train"].get("loss"),
      "params_digest": first["params_digest"],
      "restored_from": restored["resumed_from"], "restored_digest": restored["params_digest"],
      "restored_matches": restored["params_digest"] == first["params_digest"],
      "restore_wall_s": restore_wall,
      "resumed_from": resumed["resumed_from"], "resumed_digest": resumed["params_digest"],
      "resume_bit_identical": resumed["params_digest"] == first["params_digest"],
      "resume_wall_s": resume_wall, "checkpoint_bytes": ckpt_bytes,
  }


def projection(steps: dict[str, dict[str, Any]], peak_tflops: float | None,
               batches: dict[str, int]) -> dict[str, Any]:
  """Projected wall time of the paper's two training stages per dtype, against the targets.

  Args:
    steps: {"<kind> <dtype>": time_step result} (results with an "error" are skipped).
    peak_tflops: measured bf16 matmul peak (None: the needed fractions are left out).
    batches: {"cls": batch, "seg": batch} of the timed steps (for the host input rates).

  Returns:
    {"<dtype>": {"cls_s", "seg_s", "total_s", "target_total_s", "meets_target", per kind
     "<kind>": {"median_s", "steps", "stage_s", "target_step_s", "meets", "needed_tflops",
     "needed_fraction_of_peak", "achieved_fraction_of_peak", "host_rate_needed"}, "blockers": [str]}}
    for every dtype with both kinds measured (partial entries otherwise). Times in seconds.
  """
  out: dict[str, Any] = {}
  dtypes = sorted({key.split()[1] for key in steps})
  for dtype in dtypes:
    entry: dict[str, Any] = {"target_total_s": TARGET_TOTAL_S, "blockers": []}
    total = 0.0
    complete = True
    for kind in ("cls", "seg"):
      r = steps.get(f"{kind} {dtype}")
      if r is None or "error" in r or "skipped" in r:
        complete = False
        continue
      n = PAPER[kind]["steps"]
      target = TARGET_STEP_S[kind]
      needed = r["flops"] / target / 1e12 if r["flops"] > 0 else None
      k = {"median_s": r["median_s"], "steps": n, "stage_s": n * r["median_s"], "target_step_s": target,
           "meets": r["median_s"] <= target, "needed_tflops": needed,
           "needed_fraction_of_peak": needed / peak_tflops if needed and peak_tflops else None,
           "achieved_fraction_of_peak": r.get("fraction_of_peak"),
           "host_rate_needed": batches[kind] / r["median_s"]}
      entry[kind] = k
      total += k["stage_s"]
      if not k["meets"]:
        if k["needed_fraction_of_peak"] is not None and k["needed_fraction_of_peak"] > 1:
          entry["blockers"].append(
              f"{kind}: {r['flops'] / 1e12:.2f} TFLOP per step would need {needed:.0f} TFLOP/s for "
              f"{1e3 * target:.0f} ms, above the measured matmul peak ({peak_tflops:.0f}): the FLOPs "
              "themselves rule the target out at this batch, size and width")
        elif k["needed_fraction_of_peak"] is not None:
          entry["blockers"].append(
              f"{kind}: {1e3 * r['median_s']:.1f} ms per step at {100 * (k['achieved_fraction_of_peak'] or 0):.0f} % "
              f"of the matmul peak; {1e3 * target:.0f} ms needs {100 * k['needed_fraction_of_peak']:.0f} %: "
              "kernel efficiency (convolutions, BN and elementwise passes) stands in the way")
        else:
          entry["blockers"].append(f"{kind}: {1e3 * r['median_s']:.1f} ms per step > {1e3 * target:.0f} ms")
    if complete:
      entry.update(cls_s=entry["cls"]["stage_s"], seg_s=entry["seg"]["stage_s"], total_s=total,
                   meets_target=total <= TARGET_TOTAL_S)
      if total > TARGET_TOTAL_S and not entry["blockers"]:
        entry["blockers"].append(f"both steps meet their targets but the stages add up to {total:.0f} s")
    out[dtype] = entry
  return out


# ---------------------------------------------------------------------------------------------------
# Driver


def _fmt_bytes(n: int | None) -> str:
  return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _print_summary(result: dict[str, Any]) -> None:
  env = result.get("environment", {})
  print(f"\ndevice {env.get('device_kind')} ({env.get('platform')}), jax {env.get('jax')}, "
        f"jaxlib {env.get('jaxlib')} {env.get('plugins') or ''}")
  mm = result.get("matmul", {})
  if "tflops" in mm:
    print(f"bf16 matmul {mm['n']}^3: {1e3 * mm['mean_s']:.3f} ms, {mm['tflops']:.4g} TFLOP/s")
  print("| step | dtype | compile s | median ms | min ms | TFLOP/step | TFLOP/s | of peak | XLA peak | "
        "device peak | bf16 FLOP share (lowered / compiled) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for key, r in result.get("steps", {}).items():
    if "median_s" not in r:
      print(f"| {key} | {r.get('error') or r.get('skipped')} |")
      continue
    frac = "-" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f} %"
    dev_peak = (r["memory_stats"] or {}).get("peak_bytes_in_use")
    share = [r[h]["flops_fraction_bf16_operands"] for h in ("hlo_lowered", "hlo_compiled")]
    share_s = " / ".join("-" if s is None else f"{100 * s:.1f} %" for s in share)
    print(f"| {r['kind']} {r['batch']}x{r['size']}^2 w{r['width']:g} | {r['dtype']} | {r['compile_s']:.1f} | "
          f"{1e3 * r['median_s']:.2f} | {1e3 * r['min_s']:.2f} | {r['flops'] / 1e12:.4g} | {r['tflops']:.4g} | "
          f"{frac} | {_fmt_bytes(r['xla_peak_bytes'])} | {_fmt_bytes(dev_peak)} | {share_s} |")
  lp = result.get("loop", {})
  if "params_digest" in lp:
    print(f"train_loop {lp['steps']} steps ({lp['dtype']}): {lp['wall_s']:.1f} s, {lp['steps_per_s']} steps/s, "
          f"loss {lp['first_loss']:.4f} -> {lp['final_loss']:.4f}; params_digest {lp['params_digest']}; "
          f"restored from step {lp['restored_from']}: digest matches {lp['restored_matches']}; resumed from "
          f"step {lp['resumed_from']}: bit-identical {lp['resume_bit_identical']}")
  elif lp:
    print(f"train_loop: {lp.get('error') or lp.get('skipped')}")
  for dtype, p in result.get("projection", {}).items():
    if "total_s" not in p:
      print(f"projection {dtype}: incomplete (cls and seg both needed)")
    else:
      print(f"projection {dtype}: cls {p['cls_s'] / 60:.1f} min + seg {p['seg_s'] / 60:.1f} min = "
            f"{p['total_s'] / 60:.1f} min (target < {TARGET_TOTAL_S / 60:.0f} min: "
            f"{'met' if p['meets_target'] else 'NOT met'}); host input needed: "
            f"{p['cls']['host_rate_needed']:.0f} tiles/s, {p['seg']['host_rate_needed']:.0f} crops/s")
    for b in p.get("blockers", []):
      print(f"  - {b}")
  if result.get("tiny"):
    print("(--tiny: CPU-sized shapes; these figures only show that every part runs)")


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  start = time.perf_counter()
  if args.tiny:  # before the backend starts: XLA reads its flags once
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="oeem_accel_check_"))
  workdir.mkdir(parents=True, exist_ok=True)

  import jax

  from oeem_jax.runtime import io_utils
  # The loop part's steps reuse the seg part's executable (same HLO) through this cache.
  jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # the steps, not small ops

  width = args.width
  shapes = {kind: ((TINY["batch"], TINY["size"]) if args.tiny else (PAPER[kind]["batch"], PAPER[kind]["size"]))
            for kind in ("cls", "seg")}
  result: dict[str, Any] = {
      "tiny": bool(args.tiny), "argv": sys.argv if argv is None else argv, "conv_impl": args.conv_impl,
      "environment": environment(), "steps": {},
      "targets": {"total_s": TARGET_TOTAL_S, "step_s": TARGET_STEP_S,
                  "paper_steps": {k: PAPER[k]["steps"] for k in ("cls", "seg")}},
  }
  out_path = Path(args.out)
  failed = False

  def save() -> None:
    peak = result.get("matmul", {}).get("tflops")
    result["projection"] = projection(result["steps"], peak, {k: shapes[k][0] for k in shapes})
    result["elapsed_s"] = time.perf_counter() - start
    io_utils.atomic_write_json(out_path, result)

  def attempt(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    nonlocal failed
    if time.perf_counter() - start > args.budget_s:
      print(f"{label}: skipped (over --budget_s={args.budget_s:g} s)", flush=True)
      return {"skipped": f"over --budget_s={args.budget_s:g} s"}
    print(f"{label} ...", flush=True)
    t0 = time.perf_counter()
    try:
      r = fn()
    except Exception as e:  # noqa: BLE001  (recorded; the other parts still run)
      failed = True
      print(f"{label}: FAILED {type(e).__name__}: {e}", flush=True)
      return {"error": f"{type(e).__name__}: {e}"}
    print(f"{label}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    return r

  print(f"accelerator check: {result['environment']['device_kind']} ({jax.default_backend()}), "
        f"parts {','.join(args.parts)}, dtypes {','.join(args.dtypes)}, width {width:g}"
        + (" [tiny]" if args.tiny else ""), flush=True)
  try:
    if "matmul" in args.parts:
      result["matmul"] = attempt("matmul", lambda: matmul_peak(TINY["matmul_n"] if args.tiny else FULL["matmul_n"]))
      save()
    peak = result.get("matmul", {}).get("tflops")
    # Per dtype in --dtypes order: cls, seg, then the loop right after its dtype's seg step (whose
    # executable it reuses).
    plan = []
    for dtype in args.dtypes:
      plan += [(kind, dtype) for kind in ("cls", "seg") if kind in args.parts]
      if dtype == args.loop_dtype and "loop" in args.parts:
        plan.append(("loop", dtype))
    if "loop" in args.parts and args.loop_dtype not in args.dtypes:
      plan.append(("loop", args.loop_dtype))
    for kind, dtype in plan:
      if kind == "loop":
        batch, size = shapes["seg"]
        result["loop"] = attempt(f"loop {dtype}", lambda: run_loop(
            dtype, width=width, batch=batch, size=size, steps=args.loop_steps, workdir=workdir,
            conv_impl=args.conv_impl))
        save()
        continue
      batch, size = shapes[kind]
      result["steps"][f"{kind} {dtype}"] = attempt(f"{kind} {dtype}", lambda: time_step(
          kind, dtype, width=width, batch=batch, size=size, steps=args.steps, warmup=args.warmup,
          peak_tflops=peak, conv_impl=args.conv_impl))
      save()
  finally:
    save()
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  _print_summary(result)
  print(f"wrote {out_path} ({time.perf_counter() - start:.0f} s)")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
