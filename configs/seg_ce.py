r"""Stage `seg` with plain cross-entropy on CAM pseudo-masks: the "w/o OEEM" baseline (paper Table 1/3).

    python -m oeem_jax.main --config=configs/seg_ce.py[:cpu] --config.data.dir=../shared/data/glas --workdir=W

Everything else as configs/seg_oeem.py (same arguments).
"""

import importlib.util
from pathlib import Path


def _seg_oeem():
  spec = importlib.util.spec_from_file_location("configs_seg_oeem", Path(__file__).with_name("seg_oeem.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None):
  return _seg_oeem().get_seg_config(arg, loss_kind="ce", mask_source="pseudo")
