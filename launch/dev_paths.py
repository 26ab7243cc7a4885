"""Where a development checkout expects its data (used by the benchmark scripts beside this file and by
the tests, which put launch/ on sys.path); not part of the package."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_glas_dir() -> Path:
  """Where the real GlaS copy is expected: `$OEEM_GLAS_DIR`, else `<repo>/../shared/data/glas`."""
  env = os.environ.get("OEEM_GLAS_DIR")
  return Path(env) if env else (REPO_ROOT.parent / "shared" / "data" / "glas")
