"""Stage `prepare`: build the GlaS dataset (TFDS) and summarise it.

    python -m oeem_jax.main --config=configs/prepare.py --config.data.dir=../shared/data/glas --workdir=runs/x
"""

from oeem_jax.config_base import get_base_config

ARGS = {"": "no arguments"}  # what --help lists


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"configs/prepare.py: unknown argument {arg!r}; expected none")
  return get_base_config("prepare")
