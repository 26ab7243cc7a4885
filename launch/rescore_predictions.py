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

from absl import app, flags

from oeem_jax import artifacts, inference
from oeem_jax.config_base import load_config_file
from oeem_jax.data import glas
from oeem_jax.stages import eval as eval_stage

SPLITS = ("test_a", "test_b", "test")

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
  preds = {ex.name: artifacts.read_prediction(artifacts.mask_file(pred_dir, ex.name), ex.mask.shape)
           for split in ("test_a", "test_b") for ex in data.splits[split]}
  print(f"{'area':>6s} {'split':8s} {'mIoU':>7s} {'F1':>7s} {'objF1':>7s} {'objDice':>7s} "
        f"{'objHaus':>8s}")
  for area in areas:
    post = {n: inference.remove_small_regions(p, min_object_area=area, max_hole_area=area)
            for n, p in preds.items()}
    results, _ = eval_stage.score_splits(post, data.splits, SPLITS)
    for split in SPLITS:
      p, o = results[split]["pixel"], results[split]["object"]
      print(f"{area:6d} {split:8s} {100 * p['miou']:7.2f} {100 * p['f1']:7.2f} "
            f"{100 * o['f1']:7.2f} {100 * o['dice']:7.2f} {o['hausdorff']:8.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
