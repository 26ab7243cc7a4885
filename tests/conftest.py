"""Shared pytest fixtures.

* `glas_dir`: the real GlaS folder (`oeem_jax.runtime.io_utils.default_glas_dir()`, i.e. `$OEEM_GLAS_DIR` or
  `<repo>/../shared/data/glas`); tests that use it are skipped with a clear reason when it is absent.
* `glas_splits`: the real GlaS loaded once per test session (`load_splits`, default validation
  carve-out) into a session temp cache: one TFDS build per session.
* `synthetic_splits`: the embedded synthetic set (default 12 + 4 images), once per session.

`launch/` is put on sys.path: the development-only modules there (`hlo_census`, `torch_reference`)
are tested, and used by the benchmark scripts beside them, without being part of the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_collections
import pytest

from oeem_jax.config.base import get_base_config
from oeem_jax.runtime.io_utils import default_glas_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))


@pytest.fixture(scope="session")
def glas_dir() -> Path:
  d = default_glas_dir()
  if not (d / "Grade.csv").is_file():
    pytest.skip(f"real GlaS data not found at {d} (set OEEM_GLAS_DIR or place the Warwick-QU folder at "
                "../shared/data/glas relative to the repo)")
  return d


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("oeem_cache")


def _data_config(**kw) -> ml_collections.ConfigDict:
  cfg = get_base_config("prepare").data
  for k, v in kw.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope="session")
def glas_splits(glas_dir, data_cache):
  from oeem_jax.data import loader
  return loader.load_splits(_data_config(dir=str(glas_dir), cache_dir=str(data_cache)))


@pytest.fixture(scope="session")
def synthetic_splits(data_cache):
  from oeem_jax.data import loader
  return loader.load_splits(_data_config(dir="", cache_dir=str(data_cache)))
