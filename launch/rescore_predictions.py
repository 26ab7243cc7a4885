r"""Rescores saved predictions under several post-processing settings, without running the network.

    python launch/rescore_predictions.py --predictions=runs/x/eval/predictions \
        --data_dir=../shared/data/glas --areas=0,200,500,1000

`--predictions` is a folder of 0/255 masks `<name>.png` written by stage `eval` (any
`eval.min_object_area` already applied there cannot be undone: rescore a run made with 0). For each
area A in `--areas`, gland objects smaller than A pixels are removed and holes smaller than A are
filled (`oeem_jax.inference.remove_small_regions`, what `eval.min_object_area = eval.max_hole_area
= A` does in stage eval), and the pooled metrics of test_a, test_b and test are printed: pixel mIoU,
gland F1, object F1 / Dice / Hausdorff. Choosing A by these test figures would be tuning on the
test set; the `:cpu` default (500 px) comes from the training annotations (configs/eval.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

from oeem_jax import inference, metrics
from oeem_jax.config_base import load_config_file
from oeem_jax.data import glas

_PREDICTIONS = flags.DEFINE_string("predictions", None, "folder of <name>.png 0/255 predictions",
                                   required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "GlaS folder (as --config.data.dir)",
                                required=True)
_AREAS = flags.DEFINE_list("areas", ["0", "500"], "post-processing areas in pixels (0 = none)")


def main(argv):
  del argv
  pred_dir = Path(_PREDICTIONS.value)
  if not pred_dir.is_dir():
    raise app.UsageError(f"--predictions: {pred_dir} is not a folder")
  areas = [int(a) for a in _AREAS.value]
  if min(areas) < 0:
    raise app.UsageError(f"--areas: expected pixel counts >= 0, got {areas}")
  data_cfg = load_config_file("eval").get_config().data
  data_cfg.dir = _DATA_DIR.value
  data = glas.load_splits(data_cfg)
  preds = {}
  for split in ("test_a", "test_b"):
    for ex in data.splits[split]:
      path = pred_dir / f"{ex.name}.png"
      if not path.is_file():
        raise FileNotFoundError(f"{path}: no prediction for test image {ex.name}")
      pred = np.asarray(Image.open(path))
      if pred.shape != ex.mask.shape:
        raise ValueError(f"{path}: prediction {pred.shape} but image {ex.name} is "
                         f"{ex.mask.shape}")
      preds[ex.name] = (pred > 0, ex.mask)
  print(f"{'area':>6s} {'split':8s} {'mIoU':>7s} {'F1':>7s} {'objF1':>7s} {'objDice':>7s} "
        f"{'objHaus':>8s}")
  for area in areas:
    scores = {n: metrics.score_image(
        inference.remove_small_regions(p, min_object_area=area, max_hole_area=area), g, n)
              for n, (p, g) in preds.items()}
    for split in ("test_a", "test_b", "test"):
      r = metrics.pool_scores([scores[ex.name] for ex in data.splits[split]])
      p, o = r["pixel"], r["object"]
      print(f"{area:6d} {split:8s} {100 * p['miou']:7.2f} {100 * p['f1']:7.2f} "
            f"{100 * o['f1']:7.2f} {100 * o['dice']:7.2f} {o['hausdorff']:8.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
