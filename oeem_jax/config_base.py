"""Shared defaults for every stage's config (`configs/*.py` build on `get_base_config`).

Keys other tools rely on (keep these names): `data.dir`, `model.width`, `train.steps`,
`train.batch_size`, `train.lr`, `checkpoint.every`, `checkpoint.keep`, `seed`.
Each stage reads its own section; unknown sections are ignored by stages that don't need them.
"""

from __future__ import annotations

import ml_collections


def get_base_config(stage: str) -> ml_collections.ConfigDict:
  """Returns the default config for `stage` (one of prepare, cls, cam, seg, eval, pipeline)."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0

  # ---- data -----------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  # Folder in the Warwick-QU layout (train_N.png/.bmp + train_N_anno.*, testA_*, testB_*, Grade.csv).
  # Empty string: use the embedded *synthetic* GlaS-shaped set (never for reported accuracy).
  c.data.dir = ""
  # Where the synthetic set and the TFDS-prepared dataset are cached ("" = ~/.cache/oeem_jax).
  c.data.cache_dir = ""
  # Validation subset carved out of train (whole patients, both grades): a count, or a
  # comma-separated list of image names (overrides the count when non-empty).
  c.data.val_count = 10
  c.data.val_names = ""
  # Refuse a GlaS folder whose split counts differ from 85/60/20 unless this is True.
  c.data.allow_partial = False
  # Patch labels (paper 3.1, REFERENCE.md 1): tile 112 at stride 56, class present above 5 %.
  c.data.tile_size = 112
  c.data.tile_stride = 56
  c.data.label_threshold = 0.05
  # Synthetic set size (only used when data.dir is empty).
  c.data.synthetic_train = 12
  c.data.synthetic_test = 4
  return c
