"""Tests of launch/accelerator_check.py (issue 15) and launch/hlo_census.py.

One tiny-mode run of the check (CPU, ~1 min on 2 loaded cores) in a subprocess whose imports of
the packages the GPU image lacks (tensorflow, tensorflow-datasets, ml_collections, clu, torch) fail;
every test of its output reads that run's JSON. The mixed-precision claims are checked on the module
JAX hands to XLA: XLA:CPU itself turns every bf16 convolution into float32 while compiling
(`hlo_compiled` of the bf16 runs has no bf16 FLOPs), which says nothing about our code; on a GPU the
check reports the compiled module's dtypes too.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import hlo_census  # launch/hlo_census.py (conftest puts launch/ on sys.path)
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "accelerator_check.py"

# Not on the GPU image (issue 15): the check must not import them.
BLOCKED = ("tensorflow", "tensorflow_datasets", "ml_collections", "clu", "torch")
# What the GPU image has (issue 15); their dependencies come with them.
DEVICE_IMAGE = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "absl-py", "chex", "numpy", "scipy",
                "scikit-image", "pillow", "tifffile", "tensorboard")
DEVICE_IMPORTS = ("jax", "flax.linen", "optax", "orbax.checkpoint", "absl.logging", "numpy", "scipy")
# Imported by the image's packages behind try/except ImportError, so harmless where absent.
OPTIONAL = {"charset_normalizer": "numpy.f2py.crackfortran (numpy.f2py is imported on first access)"}

_BOOT = textwrap.dedent("""
    import json, runpy, sys
    # As if not installed: `import x` raises ModuleNotFoundError and importlib.util.find_spec("x")
    # is None (etils, under orbax, asks whether tensorflow is there).
    for name in sys.argv[1].split(","):
      sys.modules[name] = None
    top = lambda: sorted({m.partition(".")[0] for m, v in list(sys.modules.items()) if v is not None})
    for name in sys.argv[2].split(","):  # the image's own packages: what they import comes with them
      __import__(name)
    base = top()
    modules_out, script = sys.argv[3], sys.argv[4]
    sys.argv = [script] + sys.argv[5:]
    try:
      runpy.run_path(script, run_name="__main__")
    finally:
      with open(modules_out, "w") as f:
        json.dump({"base": base, "after": top()}, f)
""")


def _load_script():
  spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


check = _load_script()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(exit code, JSON result, imported top-level modules, output) of `--tiny` with blocked imports."""
  d = tmp_path_factory.mktemp("accel")
  out, modules = d / "tiny.json", d / "modules.json"
  proc = subprocess.run(
      [sys.executable, "-c", _BOOT, ",".join(BLOCKED), ",".join(DEVICE_IMPORTS), str(modules), str(SCRIPT), "--tiny",
       f"--out={out}", f"--workdir={d / 'work'}"],
      capture_output=True, text=True, timeout=2400, cwd=d)  # ~1 min on 2 idle cores
  text = proc.stdout + proc.stderr
  assert out.is_file(), f"no JSON written (exit {proc.returncode}):\n{text[-4000:]}"
  return proc.returncode, json.loads(out.read_text()), json.loads(modules.read_text()), text


# ---- the run and its import closure -----------------------------------------------------------------


def _requirement_closure(roots) -> set[str]:
  """Normalised names of `roots` and of everything they require here (extras followed)."""
  from packaging.requirements import Requirement

  norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
  seen: set[str] = set()
  todo = [(r, ()) for r in roots]
  while todo:
    name, extras = todo.pop()
    key = (norm(name), tuple(sorted(extras)))
    if key in seen:
      continue
    seen.add(key)
    try:
      reqs = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      continue
    for line in reqs:
      req = Requirement(line)
      wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("",) + tuple(extras))
      if wanted:
        todo.append((req.name, tuple(req.extras)))
  return {name for name, _ in seen}


def test_tiny_run_needs_only_what_the_gpu_image_has(tiny):
  rc, result, modules, text = tiny
  assert rc == 0, text[-4000:]
  assert not set(BLOCKED) & set(modules["after"])
  # Every top-level module the check adds to those the image's packages import themselves (numpy
  # and jax pull in e.g. flatbuffers, filelock, charset_normalizer, guarded or not: the image runs
  # them) is the stdlib, oeem_jax, or from a distribution one of the image's packages requires.
  allowed = _requirement_closure(DEVICE_IMAGE)
  owners = importlib.metadata.packages_distributions()
  foreign = {}
  for m in sorted(set(modules["after"]) - set(modules["base"])):
    if m in sys.stdlib_module_names or m in ("__main__", "oeem_jax", "hlo_census") or m.startswith("_") or m in OPTIONAL:
      continue
    dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(m, [])}
    if not dists & allowed:
      foreign[m] = sorted(dists) or "no distribution"
  assert not foreign, f"imported, not on the GPU image: {foreign}"
  assert {"oeem_jax", "jax", "orbax", "flax"} <= set(modules["after"]) and "oeem_jax" not in modules["base"]


def test_tiny_run_reports_every_field(tiny):
  _, r, _, text = tiny
  assert r["tiny"] is True
  env = r["environment"]
  assert env["platform"] == "cpu" and env["device_kind"] and env["jax"] and env["jaxlib"]
  assert "--xla_backend_optimization_level=0" in env["xla_flags"] and r["conv_impl"] == "xla"
  mm = r["matmul"]
  assert mm["n"] == 256 and mm["calls"] == 10
  assert math.isclose(mm["tflops"], 2 * 256 ** 3 / mm["mean_s"] / 1e12, rel_tol=1e-9)
  assert set(r["steps"]) == {"cls bfloat16", "seg bfloat16", "cls float32", "seg float32"}
  for key, s in r["steps"].items():
    kind, dtype = key.split()
    assert (s["kind"], s["dtype"], s["batch"], s["size"], s["width"]) == (kind, dtype, 2, 32, 0.125)
    assert len(s["step_s"]) == s["steps"] == 3 and s["warmup"] == 1
    assert s["min_s"] == min(s["step_s"]) and s["median_s"] == sorted(s["step_s"])[1]
    assert s["compile_s"] > 0 and s["trace_lower_s"] > 0
    assert s["flops"] > 1e8 and s["flops_lowered"] > 1e8
    assert math.isclose(s["tflops"], s["flops"] / s["median_s"] / 1e12, rel_tol=1e-9)
    assert math.isclose(s["fraction_of_peak"], s["tflops"] / mm["tflops"], rel_tol=1e-9)
    assert s["xla_peak_bytes"] > 1e6
    assert s["memory_stats"] is None  # XLA:CPU keeps no allocator statistics
    assert math.isfinite(s["final_loss"])
    expected = {"image": "float32", "label": "float32"} if kind == "cls" else {"image": "float32", "mask": "int32"}
    assert s["batch_dtypes"] == expected
  # Same network in both dtypes: XLA counts nearly the same FLOPs (the programs differ by casts).
  for kind in ("cls", "seg"):
    a, b = r["steps"][f"{kind} bfloat16"]["flops_lowered"], r["steps"][f"{kind} float32"]["flops_lowered"]
    assert 0.9 < a / b < 1.1
  assert r["steps"]["seg float32"]["flops"] > r["steps"]["cls float32"]["flops"]  # heads + aux + 4x4 dilation
  assert "train_loop 6 steps" in text and "params_digest" in text and "projection bfloat16" in text


def test_tiny_run_mixed_precision(tiny):
  """bf16 compute with float32 parameters, optimiser state, BN statistics and loss; no upcast of the
  convolutions or dots that carry the FLOPs; float32 runs hold no bf16 at all (defaults unchanged)."""
  _, r, _, _ = tiny
  for kind in ("cls", "seg"):
    bf, fp = r["steps"][f"{kind} bfloat16"], r["steps"][f"{kind} float32"]
    for s in (bf, fp):
      assert s["dtypes"]["params"] == ["float32"] and s["dtypes"]["batch_stats"] == ["float32"]
      assert s["dtypes"]["opt_state"] in (["float32"], ["float32", "int32"]) and s["dtypes"]["loss"] == "float32"
    low = bf["hlo_lowered"]
    assert low["flops_fraction_bf16_operands"] > 0.99, low["by_signature"]
    convs = low["by_signature"]["convolution bf16,bf16->bf16"]["count"]
    assert convs >= 100  # ResNet38's ~45 convolutions, forward and both gradients
    # float32 convolutions: only the final classifier convs (seg: 1x1 -> 2 classes, decode and aux,
    # forward and gradients); the classifier's head is a Dense (a dot), so none there.
    assert low["by_signature"].get("convolution f32,f32->f32", {"count": 0})["count"] <= (6 if kind == "seg" else 0)
    # Every reduction (BN mean/variance and their gradients, losses, norms) in float32.
    assert set(low["reduce_result_dtypes"]) <= {"f32", "pred", "s32"}, low["reduce_result_dtypes"]
    assert fp["hlo_lowered"]["flops_fraction_bf16_operands"] == 0.0
    assert not any("bf16" in sig for sig in fp["hlo_lowered"]["by_signature"])
    # What XLA:CPU makes of it (see the module docstring): float32 convolutions only.
    assert bf["hlo_compiled"]["flops_fraction_bf16_operands"] == 0.0


def test_tiny_run_train_loop_restores_and_resumes_exactly(tiny):
  _, r, _, _ = tiny
  lp = r["loop"]
  assert lp["steps"] == 6 and lp["dtype"] == "bfloat16" and (lp["batch"], lp["size"]) == (2, 32)
  assert re.fullmatch(r"[0-9a-f]{64}", lp["params_digest"])
  assert lp["restored_from"] == 6 and lp["restored_digest"] == lp["params_digest"] and lp["restored_matches"]
  assert lp["resumed_from"] == 3 and lp["resume_bit_identical"] is True  # CPU: exact replay
  assert math.isfinite(lp["first_loss"]) and math.isfinite(lp["final_loss"])
  assert lp["checkpoint_bytes"] > 1e6 and lp["steps_per_s"] > 0


def test_tiny_run_projection_follows_from_the_step_times(tiny):
  _, r, _, _ = tiny
  for dtype in ("bfloat16", "float32"):
    p = r["projection"][dtype]
    cls, seg = r["steps"][f"cls {dtype}"], r["steps"][f"seg {dtype}"]
    assert math.isclose(p["cls_s"], 9_703 * cls["median_s"]) and math.isclose(p["seg_s"], 10_000 * seg["median_s"])
    assert math.isclose(p["total_s"], p["cls_s"] + p["seg_s"]) and p["target_total_s"] == 900
    assert p["meets_target"] == (p["total_s"] <= 900)
    for kind, s in (("cls", cls), ("seg", seg)):
      assert p[kind]["meets"] == (s["median_s"] <= {"cls": 0.030, "seg": 0.050}[kind])
      assert math.isclose(p[kind]["host_rate_needed"], 2 / s["median_s"])
      assert math.isclose(p[kind]["needed_tflops"], s["flops"] / p[kind]["target_step_s"] / 1e12)
    assert len(p["blockers"]) == (not p["cls"]["meets"]) + (not p["seg"]["meets"])


# ---- flags and constants (no JAX needed) -----------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["--parts=matmul,gpu"], "--parts"), (["--dtypes=float16"], "--dtypes"), (["--loop_dtype=int8"], "--loop_dtype"),
    (["--steps=0"], "--steps"), (["--loop_steps=7"], "--loop_steps"), (["--width=0"], "--width"),
    (["--budget_s=-1"], "--budget_s"), (["--warmup=-1"], "--warmup"),
    (["--conv_impl=cudnn"], "--conv_impl")])
def test_bad_flags_are_clear_errors(argv, flag, capsys):
  with pytest.raises(SystemExit) as e:
    check.parse_args(argv)
  assert e.value.code == 2 and flag in capsys.readouterr().err


def test_tiny_and_full_defaults():
  full, tiny = check.parse_args([]), check.parse_args(["--tiny"])
  assert (full.steps, full.warmup, full.loop_steps, full.width) == (20, 2, 200, 1.0)
  assert (tiny.steps, tiny.warmup, tiny.loop_steps, tiny.width) == (3, 1, 6, 0.125)
  assert full.parts == ["matmul", "cls", "seg", "loop"] and full.dtypes == ["bfloat16", "float32"]
  assert full.budget_s == 480 and tiny.budget_s == math.inf
  assert (full.conv_impl, tiny.conv_impl) == ("auto", "xla")


def test_paper_constants_match_the_configs():
  from oeem_jax.config.base import load_config_file

  c = load_config_file("pipeline", REPO / "configs").get_config()
  cls, seg = c.stage_cls, c.stage_seg
  p = check.PAPER
  assert cls.model.width == seg.model.width == p["width"] == 1.0
  assert (cls.train.batch_size, cls.cls.input_size, cls.train.lr, cls.train.end_lr, cls.train.weight_decay,
          cls.cls.b7_dilation) == (p["cls"]["batch"], p["cls"]["size"], p["cls"]["lr"], p["cls"]["end_lr"],
                                   p["cls"]["weight_decay"], p["cls"]["b7_dilation"])
  assert cls.cls.epochs * 9_703 // cls.train.batch_size == p["cls"]["steps"]  # README: 9,703 tiles
  assert (seg.train.batch_size, seg.seg.crop_size, seg.train.steps, seg.train.lr, seg.train.end_lr,
          seg.train.weight_decay, seg.seg.b7_dilation, seg.seg.aux_weight, seg.seg.loss_kind) == (
              p["seg"]["batch"], p["seg"]["size"], p["seg"]["steps"], p["seg"]["lr"], p["seg"]["end_lr"],
              p["seg"]["weight_decay"], p["seg"]["b7_dilation"], p["seg"]["aux_weight"], p["seg"]["loss_kind"])
  for s in (cls, seg):
    assert (s.train.momentum, s.train.power) == (p["momentum"], p["power"])


def test_projection_names_what_stands_in_the_way():
  steps = {"cls bfloat16": {"median_s": 0.020, "flops": 5e12, "fraction_of_peak": 0.5},
           "seg bfloat16": {"median_s": 0.100, "flops": 60e12, "fraction_of_peak": 0.6}}
  p = check.projection(steps, peak_tflops=1000.0, batches={"cls": 20, "seg": 32})["bfloat16"]
  assert math.isclose(p["total_s"], 9_703 * 0.020 + 10_000 * 0.100) and not p["meets_target"]
  assert p["cls"]["meets"] and not p["seg"]["meets"]
  assert math.isclose(p["seg"]["needed_tflops"], 1200.0) and math.isclose(p["seg"]["needed_fraction_of_peak"], 1.2)
  assert len(p["blockers"]) == 1 and "above the measured matmul peak" in p["blockers"][0]
  assert math.isclose(p["cls"]["host_rate_needed"], 1000.0) and math.isclose(p["seg"]["host_rate_needed"], 320.0)
  steps["seg bfloat16"]["flops"] = 20e12  # 400 TFLOP/s needed at 50 ms: 40 % of the peak
  p = check.projection(steps, peak_tflops=1000.0, batches={"cls": 20, "seg": 32})["bfloat16"]
  assert "kernel efficiency" in p["blockers"][0] and "needs 40 %" in p["blockers"][0]


# ---- hlo_census -----------------------------------------------------------------------------------

_HLO = """HloModule m

%fused (p0: bf16[64,64], p1: bf16[64,32]) -> f32[64,32] {
  %p0 = bf16[64,64]{1,0} parameter(0)
  %p1 = bf16[64,32]{1,0} parameter(1)
  ROOT %d2 = f32[64,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %e (x: bf16[2,8,8,3], k: bf16[3,3,3,4], a: f32[4,5], b: f32[5,6]) -> f32[4,6] {
  %x = bf16[2,8,8,3]{3,2,1,0} parameter(0)
  %k = bf16[3,3,3,4]{3,2,1,0} parameter(1)
  %c = bf16[2,8,8,4]{3,2,1,0} convolution(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
  %g = (bf16[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  %r = f32[] reduce(%a, %zero), dimensions={0,1}, to_apply=%add
  %s = bf16[4]{0} reduce(%c, %zero2), dimensions={0,1,2}, to_apply=%add2
  %a = f32[4,5]{1,0} parameter(2)
  %b = f32[5,6]{1,0} parameter(3)
  ROOT %d = f32[4,6]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_hlo_census_by_hand():
  ops = {op.name: op for op in hlo_census.matmul_ops(_HLO)}
  assert set(ops) == {"d2", "c", "g", "d"}
  assert ops["c"].flops == 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3)  # 27,648: 27 multiply-adds per output
  assert ops["c"].operand_dtypes == ("bf16", "bf16") and ops["c"].signature == "bf16,bf16->bf16"
  assert ops["d"].flops == 2 * (4 * 6) * 5 and ops["d"].operand_dtypes == ("f32", "f32")
  assert ops["d2"].flops == 2 * (64 * 32) * 64 and ops["d2"].signature == "bf16,bf16->f32"
  assert ops["g"].kind == "__cudnn$convForward" and ops["g"].flops is None and ops["g"].result_shape == (2, 8, 8, 4)
  s = hlo_census.summarize(ops.values())
  assert s["count"] == 4 and s["library_calls"] == 1 and s["library_calls_bf16"] == 1
  assert s["flops_known"] == 27_648 + 240 + 262_144
  assert math.isclose(s["flops_fraction_bf16_operands"], (27_648 + 262_144) / (27_648 + 240 + 262_144))
  assert s["by_signature"]["dot f32,f32->f32"] == {"count": 1, "gflops": 2.4e-07}
  assert hlo_census.reduce_result_dtypes(_HLO) == {"f32": 1, "bf16": 1}
  with pytest.raises(ValueError, match="no HLO instructions"):
    hlo_census.matmul_ops("module @m { func.func @main() { return } }")


def test_hlo_census_of_a_lowered_jax_conv():
  import jax
  import jax.numpy as jnp

  def f(x, k):
    return jax.lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.bfloat16)
  (op,) = hlo_census.matmul_ops(jax.jit(f).lower(x, k).as_text(dialect="hlo"))
  assert op.kind == "convolution" and op.signature == "bf16,bf16->bf16" and op.result_shape == (2, 4, 4, 4)
  assert op.flops == 2 * (2 * 4 * 4 * 4) * 27
