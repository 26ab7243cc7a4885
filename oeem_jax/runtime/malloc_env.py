"""glibc malloc tuning for XLA:CPU: transparent huge pages for the per-step temporary buffers.

Each training step of XLA's CPU backend allocates one large temporary buffer (about 1.8 GiB for
`psp_cpu`, the `:cpu` PSPNet step) and frees it at the end of the step. glibc serves an allocation
this large with a fresh `mmap` every time (it is far above its 32 MiB mmap ceiling), so every step
faults the whole buffer in again, 4 KiB page by page: on the 2-core development machine the
end-to-end `pipeline.py:cpu` spent 3,421 of its 9,588 CPU seconds in the kernel (1.45e9 minor page
faults). With the glibc tunable `glibc.malloc.hugetlb=1` (glibc 2.35 or newer) malloc asks the
kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`), 2 MiB per fault: the same 100
classifier steps took 231.5 s instead of 357.8 s, with bitwise identical parameters (numbers and
commands in docs/performance.md).

A tunable is read once, when the process starts, so `oeem_jax.main` re-executes itself once with
`GLIBC_TUNABLES` extended (`ensure_hugetlb`). It does nothing when

- the system is not Linux with glibc >= 2.35, or transparent huge pages are off
  (`/sys/kernel/mm/transparent_hugepage/enabled` says `[never]`);
- `GLIBC_TUNABLES` already sets `glibc.malloc.hugetlb` (whatever the value: the user's choice wins);
- `OEEM_MALLOC_HUGETLB=0` is set (the opt-out, e.g. for an A/B timing);
- it already re-executed once (`OEEM_MALLOC_REEXEC=1`, so a failure can never loop).
"""

from __future__ import annotations

import os
import re
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT_ENV = "OEEM_MALLOC_HUGETLB"
_REEXEC_ENV = "OEEM_MALLOC_REEXEC"
_THP_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running glibc, or None (not Linux, or another C library)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    text = os.confstr("CS_GNU_LIBC_VERSION") or ""
  except (AttributeError, ValueError, OSError):
    return None
  m = re.match(r"glibc (\d+)\.(\d+)", text)
  return (int(m.group(1)), int(m.group(2))) if m else None


def thp_mode(path: str = _THP_PATH) -> str | None:
  """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), None if unknown."""
  try:
    with open(path, encoding="ascii") as f:
      m = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return m.group(1) if m else None


def hugetlb_env(environ: dict[str, str], glibc: tuple[int, int] | None,
                thp: str | None) -> dict[str, str] | None:
  """The environment to re-execute with, or None when nothing should change (see module doc).

  Args:
    environ: the current environment (not modified).
    glibc: `glibc_version()`.
    thp: `thp_mode()`.

  Returns:
    a copy of `environ` with `glibc.malloc.hugetlb=1` appended to `GLIBC_TUNABLES` (':'-separated,
    glibc's syntax) and the re-exec marker set; or None.
  """
  if glibc is None or glibc < (2, 35) or thp == "never":
    return None
  if environ.get(OPT_OUT_ENV, "").strip() == "0" or environ.get(_REEXEC_ENV) == "1":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if any(t.split("=")[0].strip() == TUNABLE for t in tunables.split(":")):
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
  env[_REEXEC_ENV] = "1"
  return env


def ensure_hugetlb() -> None:
  """Re-executes the current Python command once with `glibc.malloc.hugetlb=1` when
  `hugetlb_env` says so; returns (and the program goes on unchanged) otherwise, or when the exec
  itself fails. Call it first thing, before JAX or TensorFlow are imported (it replaces the
  process; nothing done before it survives)."""
  env = hugetlb_env(dict(os.environ), glibc_version(), thp_mode())
  if env is None or not sys.executable:
    return
  argv = list(getattr(sys, "orig_argv", []) or [])
  if not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
  except OSError:
    return


def status() -> dict[str, object]:
  """What is in force, for the `environment` block of every summary.json."""
  return {"glibc": ".".join(map(str, glibc_version() or ())) or None, "thp": thp_mode(),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
