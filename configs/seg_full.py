r"""Stage `seg` on the true GlaS masks: the fully supervised upper bound (cross-entropy).

    python -m oeem_jax.main --config=configs/seg_full.py[:cpu] --config.data.dir=../shared/data/glas --workdir=W

No pseudo-masks needed. Everything else as configs/seg_oeem.py (same arguments).
"""

import importlib.util
from pathlib import Path


def _seg_oeem():
  spec = importlib.util.spec_from_file_location("configs_seg_oeem", Path(__file__).with_name("seg_oeem.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None):
  return _seg_oeem().get_seg_config(arg, loss_kind="ce", mask_source="true")
