r"""Rescores saved predictions under several post-processing settings, without running the network.

    python launch/rescore_predictions.py --predictions=runs/x/eval/predictions \
        --data_dir=../shared/data/glas --areas=0,200,500,1000 --split_h=0,2,4

`--predictions` is a folder of 0/255 masks `<name>.png` written by stage `eval` (any
`eval.min_object_area` already applied there cannot be undone: rescore a run made with 0). For each
area A in `--areas`, gland objects smaller than A pixels are removed and holes smaller than A are
filled (`oeem_jax.evaluation.inference.remove_small_regions`, what `eval.min_object_area = eval.max_hole_area
= A` does in stage eval); for each h in `--split_h`, touching glands are split into objects with
`oeem_jax.evaluation.metrics.split_instances(mask, h)` (what `eval.split_h = h` does; 0 = 8-connected
components). The pooled metrics of each split of `--splits` (default test_a, test_b, test; `val`
for predictions of the validation carve-out, `eval.splits=val`) are printed: pixel mIoU, gland F1,
object F1 / Dice / Hausdorff and the number of predicted objects. Choosing A or h by test figures
would be tuning on the test set: choose them on `val` (docs/evaluation.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from absl import app, flags

from oeem_jax.config.base import load_config_file
from oeem_jax.data import loader
from oeem_jax.evaluation import inference, metrics
from oeem_jax.runtime import artifacts
from oeem_jax.stages import eval as eval_stage

SPLITS = ("test_a", "test_b", "test")

_PREDICTIONS = flags.DEFINE_string("predictions", None, "folder of <name>.png 0/255 predictions",
                                   required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "GlaS folder (as --config.data.dir)",
                                required=True)
_AREAS = flags.DEFINE_list("areas", ["0", "500"], "post-processing areas in pixels (0 = none)")
_SPLIT_H = flags.DEFINE_list("split_h", ["0"], "split_h values in pixels (0 = no splitting)")
_SPLITS = flags.DEFINE_list("splits", list(SPLITS), "splits to score (from train, val, test_a, "
                            "test_b, test)")

HEADER = (f"{'area':>6s} {'h':>3s} {'split':8s} {'mIoU':>7s} {'F1':>7s} {'objF1':>7s} "
          f"{'objDice':>7s} {'objHaus':>8s} {'objects':>7s}")


def rescore(preds: dict[str, Any], split_examples: dict[str, Sequence[Any]], splits: Sequence[str],
            areas: Sequence[int], split_hs: Sequence[int]) -> list[dict[str, Any]]:
  """Metrics of `preds` for every (area, h) pair.

  Args:
    preds: image name -> uint8[H, W] 0/1 prediction, for every image of `splits`.
    split_examples: split name -> its `Example`s (as `GlasSplits.splits`).
    splits: the splits to report.
    areas: post-processing areas in pixels (`inference.remove_small_regions`, objects and holes).
    split_hs: `metrics.split_instances` heights in pixels (0 = 8-connected components).

  Returns:
    one dict per (area, h, split), in that nesting order: {"area", "split_h", "split", "pixel",
    "object"} (the pooled metrics of `eval_stage.score_splits`).

  Raises:
    ValueError: a negative area or a bad h (named).
  """
  if areas and min(areas) < 0:
    raise ValueError(f"--areas: expected pixel counts >= 0, got {list(areas)}")
  for h in split_hs:
    metrics.check_split_h(h, "--split_h")
  out = []
  for area in areas:
    post = {n: inference.remove_small_regions(p, min_object_area=area, max_hole_area=area)
            for n, p in preds.items()}
    for h in split_hs:
      results, _ = eval_stage.score_splits(post, split_examples, splits, split_h=h)
      out += [{"area": area, "split_h": h, "split": s, **results[s]} for s in splits]
  return out


def format_row(r: dict[str, Any]) -> str:
  p, o = r["pixel"], r["object"]
  return (f"{r['area']:6d} {r['split_h']:3d} {r['split']:8s} {100 * p['miou']:7.2f} "
          f"{100 * p['f1']:7.2f} {100 * o['f1']:7.2f} {100 * o['dice']:7.2f} "
          f"{o['hausdorff']:8.1f} {o['num_pred_objects']:7d}")


def main(argv):
  del argv
  pred_dir = Path(_PREDICTIONS.value)
  if not pred_dir.is_dir():
    raise app.UsageError(f"--predictions: {pred_dir} is not a folder")
  try:
    areas = [int(a) for a in _AREAS.value]
    split_hs = [int(h) for h in _SPLIT_H.value]
  except ValueError as e:
    raise app.UsageError(f"--areas / --split_h: expected integers ({e})") from None
  data_cfg = load_config_file("eval").get_config().data
  data_cfg.dir = _DATA_DIR.value
  data = loader.load_splits(data_cfg)
  splits = list(_SPLITS.value)
  unknown = [s for s in splits if s not in data.splits]
  if unknown:
    raise app.UsageError(f"--splits: {unknown} unknown; expected names from "
                         + ", ".join(sorted(data.splits)))
  preds = {ex.name: artifacts.read_prediction(artifacts.mask_file(pred_dir, ex.name), ex.mask.shape)
           for split in splits for ex in data.splits[split]}
  print(HEADER)
  try:
    for r in rescore(preds, data.splits, splits, areas, split_hs):
      print(format_row(r), flush=True)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
