r"""Stage `seg` on the true GlaS masks: the fully supervised upper bound (cross-entropy).

    python -m oeem_jax.main --config=configs/seg_full.py[:cpu] --config.data.dir=../shared/data/glas --workdir=W

No pseudo-masks needed. Everything else as configs/seg_oeem.py (same arguments).
"""

from pathlib import Path

from oeem_jax.config.base import load_config_file

ARGS = load_config_file("seg_oeem", Path(__file__).parent).ARGS  # the same arguments (--help)


def get_config(arg: str | None = None):
  seg_oeem = load_config_file("seg_oeem", Path(__file__).parent)
  return seg_oeem.get_seg_config(arg, loss_kind="ce", mask_source="true", config_file=__file__)
