"""What a run ran on: package versions, CPU model and features, JAX devices (for every summary.json).

Two runs whose `environment` blocks differ may legitimately print different numbers: the training
trajectories of the tiny CPU runs are chaotic, so a different jaxlib (XLA fusion and reduction
order), NumPy/SciPy (the synthetic set, augmentation) or TensorFlow (tf.data image ops) changes the
low-order bits of the first steps and, through them, the final figures. `constraints.txt` pins the
versions the README's figures come from (`pip install -e . -c constraints.txt`).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from oeem_jax.runtime import malloc_env

# Distributions whose version can change the numbers (direct dependencies and the transitive ones
# that compute): recorded in every summary.json and pinned in constraints.txt.
NUMERIC_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu",
                    "tensorflow", "tensorflow-datasets", "numpy", "scipy", "scikit-image", "pillow",
                    "clu", "ml-dtypes", "ml-collections", "torch", "oeem_jax")

# x86 / ARM SIMD features that change which kernels XLA's CPU backend emits.
_SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
               "asimd", "sve")


def package_versions(names=NUMERIC_PACKAGES) -> dict[str, str | None]:
  """{distribution name: installed version, or None when not installed}."""
  out: dict[str, str | None] = {}
  for name in names:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def cpu_info() -> dict[str, Any]:
  """CPU model name, vendor, logical core count and SIMD flags (from /proc/cpuinfo on Linux).

  Returns:
    {"model": str, "vendor": str | None, "family_model": "family/model" or None, "cores": int,
     "simd": [flags present among _SIMD_FLAGS]}; on other systems model falls back to
    `platform.processor()` and simd to [].
  """
  info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "vendor": None,
                          "family_model": None, "cores": os.cpu_count(), "simd": []}
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      text = f.read()
  except OSError:
    return info
  fields: dict[str, str] = {}
  for line in text.splitlines():
    if not line.strip():
      break  # the first processor's block is enough
    key, _, value = line.partition(":")
    fields[key.strip()] = value.strip()
  info["model"] = fields.get("model name") or fields.get("Model") or info["model"]
  info["vendor"] = fields.get("vendor_id") or fields.get("CPU implementer")
  if "cpu family" in fields and "model" in fields:
    info["family_model"] = f"{fields['cpu family']}/{fields['model']}"
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  info["simd"] = [f for f in _SIMD_FLAGS if f in flags]
  return info


def device_info() -> dict[str, Any]:
  """JAX backend facts: platform, device kind, local / global device counts, process count."""
  import jax

  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "local_devices": jax.local_device_count(), "global_devices": len(devices),
          "processes": jax.process_count()}


def environment() -> dict[str, Any]:
  """Everything above plus Python, OS and the XLA flags in force (`summary.json` key
  `environment`)."""
  return {
      "python": platform.python_version(),
      "os": f"{platform.system()} {platform.release()}",
      "packages": package_versions(),
      "cpu": cpu_info(),
      "devices": device_info(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "malloc": malloc_env.status(),
      "executable": sys.executable,
      "source": source_commit(),
  }


def source_commit() -> dict[str, Any]:
  """The git commit of the oeem_jax source tree and whether it had uncommitted changes to tracked
  files ({"commit": None} outside a git checkout or without git)."""
  import subprocess
  from pathlib import Path

  root = Path(__file__).resolve().parents[2]
  try:
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--"],
                           capture_output=True, timeout=10).returncode != 0
  except (OSError, subprocess.SubprocessError):
    return {"commit": None}
  return {"commit": commit, "dirty": dirty}
