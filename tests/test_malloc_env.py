"""glibc's huge-page malloc tunable, set by oeem_jax.main for itself (oeem_jax/runtime/malloc_env.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from oeem_jax.runtime import malloc_env

REPO = Path(__file__).resolve().parents[1]
T = "glibc.malloc.hugetlb"


def test_hugetlb_env_appends_once_and_respects_the_user_and_the_system():
  env = malloc_env.hugetlb_env({"PATH": "/bin"}, (2, 36), "madvise")
  assert env["GLIBC_TUNABLES"] == f"{T}=1" and env["OEEM_MALLOC_REEXEC"] == "1"
  assert env["PATH"] == "/bin"
  # other tunables are kept, ':'-separated (glibc's syntax)
  env = malloc_env.hugetlb_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 35), "always")
  assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{T}=1"
  given = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
  assert malloc_env.hugetlb_env(given, (2, 36), "madvise") is None  # the user's own value wins
  assert malloc_env.hugetlb_env({"OEEM_MALLOC_HUGETLB": "0"}, (2, 36), "madvise") is None
  assert malloc_env.hugetlb_env({"OEEM_MALLOC_REEXEC": "1"}, (2, 36), "madvise") is None  # no loop
  assert malloc_env.hugetlb_env({}, (2, 34), "madvise") is None  # tunable unknown before 2.35
  assert malloc_env.hugetlb_env({}, None, "madvise") is None  # macOS, musl
  assert malloc_env.hugetlb_env({}, (2, 36), "never") is None  # THP off: nothing to gain


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  (tmp_path / "enabled").write_text("always [madvise] never\n")
  assert malloc_env.thp_mode(str(tmp_path / "enabled")) == "madvise"
  assert malloc_env.thp_mode(str(tmp_path / "missing")) is None


def _child(code: str, **extra: str) -> str:
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "OEEM_MALLOC_REEXEC", "OEEM_MALLOC_HUGETLB")}
  env.update(extra, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120, check=True)
  return proc.stdout


_CODE = ("import os; from oeem_jax.runtime import malloc_env; print('start'); malloc_env.ensure_hugetlb(); "
         "print('tunables', os.environ.get('GLIBC_TUNABLES'))")


@pytest.mark.skipif(malloc_env.hugetlb_env({}, malloc_env.glibc_version(),
                                           malloc_env.thp_mode()) is None,
                    reason="not Linux with glibc >= 2.35 and transparent huge pages on")
def test_the_process_reexecutes_once_with_the_tunable_and_the_opt_out_keeps_it_off():
  out = _child(_CODE).split("\n")
  # the first process printed 'start' and was replaced; the second ran the same command once
  assert out[:3] == ["start", "start", f"tunables {T}=1"], out
  out = _child(_CODE, OEEM_MALLOC_HUGETLB="0").split("\n")
  assert out[:2] == ["start", "tunables None"], out
  out = _child(_CODE, GLIBC_TUNABLES="glibc.malloc.arena_max=4").split("\n")
  assert out[:3] == ["start", "start", f"tunables glibc.malloc.arena_max=4:{T}=1"], out
