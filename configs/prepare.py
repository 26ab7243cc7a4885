"""Stage `prepare`: build the GlaS dataset (TFDS) and summarise it.

    python -m oeem_jax.main --config=configs/prepare.py --config.data.dir=../shared/data/glas --workdir=runs/x
"""

from oeem_jax.config import base as config_base

ARGS = {"": "no arguments"}  # what --help lists


def get_config(arg: str | None = None):
  config_base.parse_arg(arg, ARGS, __file__)
  return config_base.get_base_config("prepare")
