r"""Stage `export`: a self-contained model folder from a finished seg stage.

    python -m oeem_jax.main --config=configs/export.py --workdir=W
    python -m oeem_jax.main --config=configs/export.py --config.export.checkpoint=best --workdir=W

Writes W/export/model/ (variables/ + model.json); `configs/predict.py` loads it. See docs/predict.md.
"""

import ml_collections

from oeem_jax.config import base as config_base

ARGS = {"": "no arguments"}  # what --help lists


def get_config(arg: str | None = None):
  config_base.parse_arg(arg, ARGS, __file__)
  c = config_base.get_base_config("export")
  c.export = ml_collections.ConfigDict()
  c.export.seg_dir = ""          # "" = WORKDIR/seg
  # "" = the checkpoint WORKDIR/eval used (so predict reproduces eval), else "latest"; or "best" / a step.
  c.export.checkpoint = ""
  c.export.out = ""              # "" = WORKDIR/export/model
  # Training pixel size in µm/px: -1 = auto (GlaS 0.62 when the seg run trained on a GlaS folder,
  # unknown on the synthetic set), 0 = unknown (predict never rescales), > 0 = this value.
  c.export.pixel_size_um = -1.0
  # Folder of the training images for the stain reference: "" = the seg run's data.dir (relative
  # paths resolve from the current folder), "none" = no reference (predict then skips the check).
  c.export.data_dir = ""
  return c
