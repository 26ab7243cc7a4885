"""Which dtypes the convolutions and matrix products of an XLA program run in (mixed precision check).

Reads the text of an HLO module, either the one JAX hands to XLA (`jax.jit(f).lower(...).as_text(
dialect="hlo")`) or the optimised one (`....compile().as_text()`), and lists every `convolution`,
`dot` and library call (cuDNN convolution / cuBLAS GEMM custom-calls on GPU) with the dtypes of its
operands and result and, for `convolution` and `dot`, its FLOPs (2 per multiply-add, from the
shapes and `dim_labels` / contracting dimensions). `summarize` adds them up per operand-dtype
signature, so a test or launch/accelerator_check.py can state e.g. "99.9 % of the conv and dot FLOPs
take bf16 operands".

Where to read it: XLA:CPU converts every bf16 convolution to float32 while compiling (the
compiled CPU module of a bf16 PSPNet step has only f32 convolutions), so on CPU only the module
before optimisation says what the program asks for; on GPU the compiled module says what cuDNN and
cuBLAS are given.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Iterable

# "name = type opcode(operands), attributes" (names with or without '%', optional ROOT).
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>\([^=]*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?|\w+\[\]|\w+)"
    r"\s+(?P<op>[\w\-]+)\((?P<operands>[^)]*)\)(?P<attrs>.*)$")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]+)"')
_DIM_LABELS = re.compile(r"dim_labels=(?P<lhs>\w+)_(?P<rhs>\w+)->(?P<out>\w+)")
_CONTRACT = re.compile(r"lhs_contracting_dims=\{(?P<dims>[\d,]*)\}")

# Library calls that are convolutions or matrix products (cuDNN, cuBLAS, cuBLASLt).
LIBRARY_TARGETS = ("__cudnn$conv", "__cublas$gemm", "__cublas$lt$matmul")


@dataclasses.dataclass(frozen=True)
class MatmulOp:
  """One convolution / dot / library call of an HLO module.

  Attributes:
    name: instruction name.
    kind: "convolution", "dot" or the custom-call target (e.g. "__cudnn$convForward").
    operand_dtypes: HLO element types of the operands ("bf16", "f32", ...), in order.
    result_dtype: element type of the result (first tuple element for library calls).
    result_shape: dimensions of that result.
    flops: 2 x multiply-adds for "convolution" and "dot"; None for library calls. Convolutions are
      counted dense (every kernel tap, padding included), so small dilated maps count more than
      XLA's `cost_analysis()`, which skips taps that fall in the padding.
  """
  name: str
  kind: str
  operand_dtypes: tuple[str, ...]
  result_dtype: str
  result_shape: tuple[int, ...]
  flops: float | None

  @property
  def signature(self) -> str:
    """"bf16,bf16->f32" style: operand dtypes -> result dtype."""
    return f"{','.join(self.operand_dtypes)}->{self.result_dtype}"


def _first_array(type_str: str) -> tuple[str, tuple[int, ...]]:
  m = _ARRAY.search(type_str)
  if m is None:
    return type_str.strip("()"), ()
  dims = tuple(int(d) for d in m.group("dims").split(",") if d)
  return m.group("dtype"), dims


def _operand_names(operands: str) -> list[str]:
  # "a, b" (lowered text) or "bf16[2,3]{1,0} %a, f32[3] %b" (some printers): the last token is the name.
  out = []
  for part in operands.split(","):
    part = part.strip()
    if part:
      out.append(part.split()[-1].lstrip("%"))
  return out


def matmul_ops(hlo_text: str) -> list[MatmulOp]:
  """Every convolution, dot and cuDNN/cuBLAS custom-call of an HLO module text, in text order.

  Args:
    hlo_text: `Lowered.as_text(dialect="hlo")` or `Compiled.as_text()` (all computations, fused
      ones included).

  Returns:
    list of `MatmulOp`.

  Raises:
    ValueError: the text holds no HLO instruction at all (e.g. StableHLO was passed).
  """
  types: dict[str, str] = {}
  found: list[tuple[str, str, str, list[str], str]] = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m is None:
      continue
    name, type_str, op = m.group("name"), m.group("type"), m.group("op")
    types[name] = type_str
    if op in ("convolution", "dot") or op == "custom-call":
      found.append((name, type_str, op, _operand_names(m.group("operands")), m.group("attrs")))
  if not types:
    raise ValueError("hlo_census: no HLO instructions found (pass HLO text, e.g. "
                     "lowered.as_text(dialect='hlo') or compiled.as_text(), not StableHLO)")
  ops = []
  for name, type_str, op, operand_names, attrs in found:
    kind = op
    if op == "custom-call":
      t = _TARGET.search(attrs)
      target = t.group("target") if t else ""
      if not target.startswith(LIBRARY_TARGETS):
        continue
      kind = target
    operand_types = [types.get(o, "?") for o in operand_names]
    operand_dtypes = tuple(_first_array(t)[0] for t in operand_types)
    result_dtype, result_shape = _first_array(type_str)
    flops = None
    if op == "convolution" and len(operand_types) == 2:
      labels = _DIM_LABELS.search(attrs)
      _, kernel = _first_array(operand_types[1])
      if labels and kernel:
        # Each output element sums over the kernel's spatial x input-feature extent.
        o = labels.group("rhs").index("o")
        flops = 2.0 * math.prod(result_shape) * math.prod(kernel) / kernel[o]
    elif op == "dot" and operand_types:
      contract = _CONTRACT.search(attrs)
      _, lhs = _first_array(operand_types[0])
      if contract is not None and lhs:
        k = math.prod(lhs[int(d)] for d in contract.group("dims").split(",") if d)
        flops = 2.0 * math.prod(result_shape) * k
    ops.append(MatmulOp(name, kind, operand_dtypes, result_dtype, result_shape, flops))
  return ops


def reduce_result_dtypes(hlo_text: str) -> dict[str, int]:
  """Counts of the result element types of every `reduce` instruction (e.g. {"f32": 120}).

  With float32 statistics (BatchNorm mean/variance, losses, gradient sums) a bf16 program has no
  bf16 `reduce`; tuple-valued reduces count their first element.
  """
  counts: collections.Counter[str] = collections.Counter()
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m is not None and m.group("op") == "reduce":
      counts[_first_array(m.group("type"))[0]] += 1
  return dict(counts)


def summarize(ops: Iterable[MatmulOp]) -> dict[str, Any]:
  """Totals of `matmul_ops` per kind and operand-dtype signature.

  Returns:
    {"count": int, "by_signature": {"<kind> <signature>": {"count": n, "gflops": float | None}},
     "flops_known": total FLOPs of the ops with a FLOP count,
     "flops_fraction_bf16_operands": share of those FLOPs whose operands are all bf16 (None when no
       FLOPs are known), "library_calls_bf16": library calls whose two factors are bf16,
     "library_calls": all library calls}.
  """
  ops = list(ops)
  by: dict[str, dict[str, Any]] = {}
  total = bf16 = 0.0
  lib = lib_bf16 = 0
  for op in ops:
    key = f"{op.kind} {op.signature}"
    entry = by.setdefault(key, {"count": 0, "gflops": None})
    entry["count"] += 1
    if op.flops is not None:
      entry["gflops"] = (entry["gflops"] or 0.0) + op.flops / 1e9
      total += op.flops
      if all(d == "bf16" for d in op.operand_dtypes):
        bf16 += op.flops
    else:  # a library call: its first two operands are the two factors (then bias, scratch, ...)
      lib += 1
      lib_bf16 += all(d == "bf16" for d in op.operand_dtypes[:2])
  for entry in by.values():
    if entry["gflops"] is not None:
      entry["gflops"] = float(f"{entry['gflops']:.6g}")
  return {"count": len(ops), "by_signature": dict(sorted(by.items())), "flops_known": total,
          "flops_fraction_bf16_operands": (bf16 / total) if total else None,
          "library_calls_bf16": lib_bf16, "library_calls": lib}
