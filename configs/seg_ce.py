r"""Stage `seg` with plain cross-entropy on CAM pseudo-masks: the "w/o OEEM" baseline (paper Table 1/3).

    python -m oeem_jax.main --config=configs/seg_ce.py[:cpu] --config.data.dir=../shared/data/glas --workdir=W

Everything else as configs/seg_oeem.py (same arguments).
"""

from pathlib import Path

from oeem_jax.config.base import load_config_file

ARGS = load_config_file("seg_oeem", Path(__file__).parent).ARGS  # the same arguments (--help)


def get_config(arg: str | None = None):
  seg_oeem = load_config_file("seg_oeem", Path(__file__).parent)
  return seg_oeem.get_seg_config(arg, loss_kind="ce", mask_source="pseudo", config_file=__file__)
