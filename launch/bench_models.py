"""Speed of one jitted SGD training step (forward, backward, update) of the OEEM networks.

Prints, per configuration: compile time, median step time over --steps steps, XLA FLOPs per step
(compiled.cost_analysis()), achieved GFLOP/s, and peak memory (XLA's buffer assignment:
arguments + outputs + temporaries - aliased, and the process's max RSS at the end).

Configurations are the product of --models x --widths x --dtypes x --xla variants x --conv. All are compiled
first, then timed *interleaved* (round r times step r of every configuration), so load from other
processes on a shared machine hits all of them alike. --torch adds the PyTorch implementation
(`launch/torch_reference.py`) on the same shapes (NCHW, torch's own threads) to the same rounds.

Models (shapes as in issue 3; the classifier trains on 224 crops in the reference):
  cls     CAMClassifier, batch 4 x 112^2, reference mode (BN frozen, conv1a + BN gamma/beta frozen),
          BCE-with-logits, SGD momentum.
  cls224  the same at 224^2.
  psp     PSPNet, batch 2 x 256^2, BN training, CE + 0.4 * aux CE, SGD momentum + weight decay.

Examples:
  python launch/bench_models.py                                  # default table (w 1.0 and 0.25)
  python launch/bench_models.py --models=cls --widths=1.0 --dtypes=float32,bfloat16 --torch
  python launch/bench_models.py --models=psp --widths=1.0 --conv=xla,dots --torch   # conv gradients A/B
  python launch/bench_models.py --models=cls --widths=1.0 \
      --xla='base;onednn=xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'

XLA variants: 'name=opt=value,opt=value;name2=...' ('base' or an empty spec = no options); the options
are XLA DebugOptions passed per compilation (`lowered.compile(compiler_options=...)`), so variants
can be compared in one process. Process-wide flags (XLA_FLAGS, threads) need separate runs.

Like `python -m oeem_jax.main`, the script re-executes itself with glibc's huge-page malloc tunable
(oeem_jax/runtime/malloc_env.py), so it times what the training runs get; `OEEM_MALLOC_HUGETLB=0` times
glibc's default malloc instead (a separate process: A/B by alternating runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from oeem_jax.engine.optim import mask_frozen
from oeem_jax.models import CAMClassifier, PSPNet, trainable_mask
from oeem_jax.runtime import malloc_env

SHAPES = {"cls": (4, 112), "cls224": (4, 224), "psp": (2, 256),
          # the :cpu configurations' training batches (configs/cls.py:cpu, configs/seg_oeem.py:cpu)
          "cls_cpu": (20, 112), "psp_cpu": (8, 112), "psp_paper": (32, 256), "cls_paper": (20, 224)}


@dataclasses.dataclass
class Run:
  name: str
  step: Callable[[], Any]  # one step, blocking
  compile_s: float = float("nan")
  flops: float = float("nan")
  mem_bytes: float = float("nan")
  times: list = dataclasses.field(default_factory=list)


def _parse_variants(spec: str) -> list[tuple[str, dict[str, Any]]]:
  out = []
  for part in spec.split(";"):
    part = part.strip()
    if not part:
      continue
    name, _, opts = part.partition("=")
    d: dict[str, Any] = {}
    for kv in filter(None, opts.split(",")):
      k, _, v = kv.partition("=")
      v = {"true": True, "false": False}.get(v.lower(), v)
      if isinstance(v, str):
        try:
          v = int(v)
        except ValueError:
          pass
      d[k.strip()] = v
    out.append((name, d))
  return out or [("base", {})]


def _host_fill(abstract, seed: int = 0):
  """Parameters with the model's structure, random on the host (skips compiling model.init).

  Kernels ~ N(0, 1/(3 fan_in)) (the variance of PyTorch's default conv init), BN identity: with frozen
  BN a He-scaled init would blow activations up over the 20 residual blocks.
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = str(path[-1].key)
    if name == "kernel":
      fan_in = int(np.prod(s.shape[:-1]))
      return jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32) * np.float32(np.sqrt(1.0 / (3 * fan_in))))
    if name in ("scale", "var"):
      return jnp.ones(s.shape, s.dtype)
    return jnp.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def make_jax_run(kind: str, width: float, dtype: str, variant: tuple[str, dict], conv_impl: str = "auto",
                 seed: int = 0, backbone: str = "resnet38") -> Run:
  batch, size = SHAPES[kind]
  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  x = jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32))
  if kind.startswith("cls"):
    model = CAMClassifier(width=width, bn_frozen=True, dtype=dt, backbone_name=backbone,
                          conv_impl=conv_impl)
    y = jnp.asarray(np.random.default_rng(seed + 1).integers(0, 2, (batch, 2)).astype(np.float32))
  else:
    model = PSPNet(width=width, dtype=dt, backbone_name=backbone, conv_impl=conv_impl)
    y = jnp.asarray(np.random.default_rng(seed + 1).integers(0, 2, (batch, size, size)))
  abstract = jax.eval_shape(lambda: model.init(rngs, jnp.zeros((1, 32, 32, 3)), train=False))
  variables = _host_fill(abstract, seed)
  params, batch_stats = variables["params"], variables["batch_stats"]
  if kind.startswith("cls"):
    tx = mask_frozen(optax.sgd(1e-3, momentum=0.9), trainable_mask(params, freeze_stem=True, freeze_bn=True))
  else:
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(1e-3, momentum=0.9))
  opt_state = tx.init(params)

  def loss_fn(params, batch_stats, x, y, key):
    out, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                           rngs={"dropout": key}, mutable=["batch_stats"])
    if kind.startswith("cls"):
      loss = optax.sigmoid_binary_cross_entropy(out, y).mean()
    else:
      ce = lambda lo: optax.softmax_cross_entropy_with_integer_labels(lo, y).mean()  # noqa: E731
      loss = ce(out[0]) + 0.4 * ce(out[1])
    return loss, upd["batch_stats"]

  def train_step(params, batch_stats, opt_state, x, y, key):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  vname, opts = variant
  name = (f"jax {backbone} {kind} w{width:g} {batch}x{size}^2 {dtype} conv={conv_impl}"
          + ("" if vname == "base" else f" [{vname}]"))
  jitted = jax.jit(train_step, donate_argnums=(0, 1, 2))
  key = jax.random.key(seed)
  t0 = time.perf_counter()
  compiled = jitted.lower(params, batch_stats, opt_state, x, y, key).compile(compiler_options=opts or None)
  compile_s = time.perf_counter() - t0
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  ma = compiled.memory_analysis()
  mem = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
         - ma.alias_size_in_bytes) if ma is not None else float("nan")
  state = {"p": params, "b": batch_stats, "o": opt_state, "i": 0}

  def step():
    k = jax.random.fold_in(key, state["i"])
    state["p"], state["b"], state["o"], loss = compiled(state["p"], state["b"], state["o"], x, y, k)
    state["i"] += 1
    loss.block_until_ready()
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f"{name}: loss is {float(loss)}")

  return Run(name, step, compile_s, float(ca.get("flops", float("nan"))), float(mem))


def make_torch_run(kind: str, width: float, seed: int = 0, backbone: str = "resnet38") -> Run:
  """The same step in PyTorch (`launch/torch_reference.py`; for EfficientNet-Lite on
  `efficientnet_lite_pytorch`), NCHW, float32."""
  import torch  # noqa: PLC0415
  import torch_reference as ref  # noqa: PLC0415  (launch/torch_reference.py, beside this script)

  eff = backbone != "resnet38"
  batch, size = SHAPES[kind]
  torch.manual_seed(seed)
  x = torch.randn(batch, 3, size, size)
  if kind.startswith("cls"):
    net = ref.TorchEffCAMClassifier(variant=backbone) if eff else ref.TorchCAMClassifier(width)
    net.train()
    frozen = []
    for name, m in net.named_modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.eval()
        frozen += list(m.parameters())
    frozen += list((net.backbone._conv_stem if eff else net.backbone.conv1a).parameters())
    for p in frozen:
      p.requires_grad_(False)
    y = torch.randint(0, 2, (batch, 2)).float()
    loss_fn = lambda: torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)  # noqa: E731
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
  else:
    net = ref.TorchEffPSPNet(width, variant=backbone) if eff else ref.TorchPSPNet(width)
    net.train()
    y = torch.randint(0, 2, (batch, size, size))

    def loss_fn():
      lo, aux = net(x)
      return torch.nn.functional.cross_entropy(lo, y) + 0.4 * torch.nn.functional.cross_entropy(aux, y)

    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    opt.step()

  return Run(f"torch {backbone} {kind} w{width:g} {batch}x{size}^2 float32 ({torch.get_num_threads()} thr)", step,
             compile_s=0.0)


# (batch, side, channels, kernel, stride, dilation): depthwise convs of Lite0 at output stride 8 on
# the :cpu classifier batch (20 x 112^2): block 1 (stride 2), block 3 (stride 2), blocks 9 and 13.
DEPTHWISE_SHAPES = ((20, 56, 96, 3, 2, 1), (20, 28, 144, 5, 2, 1), (20, 14, 672, 5, 1, 2),
                    (20, 14, 1152, 5, 1, 4))


def bench_depthwise(steps: int, with_torch: bool) -> int:
  """Times one depthwise conv's forward + input and weight gradients, three ways, interleaved."""
  from oeem_jax.models import efficientnet_lite as E  # noqa: PLC0415

  print(f"jax {jax.__version__} backend={jax.default_backend()} cpus={os.cpu_count()} "
        f"loadavg={os.getloadavg()}", flush=True)
  print("| shape (N, H, C, k, stride, dilation) | XLA grouped conv s | taps (ours) s | torch s |")
  print("|---|---|---|---|")
  for n, h, c, k, s, d in DEPTHWISE_SHAPES:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, h, c), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, 1, c), dtype=np.float32))
    fns = {
        "xla": jax.jit(jax.grad(lambda a, b: jnp.sum(E._tf_conv(a, b, s, d, c) ** 2), (0, 1))),
        "taps": jax.jit(jax.grad(lambda a, b: jnp.sum(E.depthwise_conv(a, b, s, d) ** 2), (0, 1))),
    }
    times = {key: [] for key in fns}
    if with_torch:
      import torch  # noqa: PLC0415
      xt = torch.randn(n, c, h, h, requires_grad=True)
      wt = torch.randn(c, 1, k, k, requires_grad=True)

      def torch_step():
        y = torch.nn.functional.conv2d(xt, wt, stride=s, padding=d * (k - 1) // 2, dilation=d, groups=c)
        (y ** 2).sum().backward()
      times["torch"] = []
    for key, f in fns.items():
      jax.block_until_ready(f(x, w))
    for _ in range(steps):
      for key, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, w))
        times[key].append(time.perf_counter() - t0)
      if with_torch:
        t0 = time.perf_counter()
        torch_step()
        times["torch"].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"| {(n, h, c, k, s, d)} | {med['xla']:.4f} | {med['taps']:.4f} | "
          f"{med.get('torch', float('nan')):.4f} |", flush=True)
  return 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default="cls,cls224,psp",
                  help="comma list of " + ", ".join(SHAPES) + " (batch x side in SHAPES)")
  ap.add_argument("--widths", default="1.0,0.25")
  ap.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16 (compute dtype)")
  ap.add_argument("--xla", default="base", help="XLA option variants, see the module docstring")
  ap.add_argument("--conv", default="auto",
                  help="comma list of conv gradient implementations: auto, xla, dots (the networks' conv_impl)")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (>= 5 recommended)")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--torch", action="store_true", help="also time the PyTorch implementation")
  ap.add_argument("--backbones", default="resnet38", help="comma list of resnet38, efficientnet_lite0, efficientnet_lite1, "
                  "efficientnet_lite2 (EfficientNet-Lite has a fixed width: --widths scales only its PSPNet heads)")
  ap.add_argument("--depthwise", action="store_true",
                  help="only time EfficientNet-Lite0's depthwise convs (forward + both gradients): XLA's "
                       "grouped convolution vs efficientnet_lite.depthwise_conv (vs torch with --torch)")
  args = ap.parse_args(argv)
  if args.depthwise:
    return bench_depthwise(args.steps, args.torch)

  print(f"jax {jax.__version__} backend={jax.default_backend()} devices={jax.devices()} "
        f"cpus={os.cpu_count()} loadavg={os.getloadavg()} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} "
        f"malloc={malloc_env.status()}",
        flush=True)
  runs: list[Run] = []
  for kind in args.models.split(","):
    if kind not in SHAPES:
      raise SystemExit(f"--models: unknown model {kind!r}; expected one of {sorted(SHAPES)}")
    for backbone in args.backbones.split(","):
      for w in (float(s) for s in args.widths.split(",")):
        if args.torch:
          runs.append(make_torch_run(kind, w, backbone=backbone))
        for dtype in args.dtypes.split(","):
          for variant in _parse_variants(args.xla):
            for conv_impl in args.conv.split(","):
              r = make_jax_run(kind, w, dtype, variant, conv_impl, backbone=backbone)
              print(f"compiled {r.name}: {r.compile_s:.1f} s", flush=True)
              runs.append(r)
  for r in runs:
    for _ in range(args.warmup):
      r.step()
  for i in range(args.steps):  # interleaved rounds
    for r in runs:
      t0 = time.perf_counter()
      r.step()
      r.times.append(time.perf_counter() - t0)
    print(f"round {i + 1}/{args.steps} done, loadavg {os.getloadavg()[0]:.1f}", flush=True)

  rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"\nprocess max RSS: {rss_gib:.2f} GiB; loadavg at end {os.getloadavg()}")
  print("| config | compile s | median step s | min step s | GFLOP/step | GFLOP/s | XLA peak GiB |")
  print("|---|---|---|---|---|---|---|")
  for r in runs:
    med, mn = statistics.median(r.times), min(r.times)
    gf = r.flops / 1e9
    print(f"| {r.name} | {r.compile_s:.1f} | {med:.3f} | {mn:.3f} | {gf:.1f} | {gf / med:.0f} | "
          f"{r.mem_bytes / 2**30:.2f} |")
  return 0


if __name__ == "__main__":
  malloc_env.ensure_hugetlb()
  raise SystemExit(main())
