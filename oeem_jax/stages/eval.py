"""Stage `eval`: predict the test images with the trained segmenter and score them.

Restores the segmenter checkpoint (orbax; `eval.checkpoint`, default the final one, "latest")
from `eval.seg_dir` (default WORKDIR/seg), predicts every image of `eval.splits` with multi-scale ×
flip sliding-window inference (docs/reference.md §6, `oeem_jax.evaluation.inference.predict_probs`) and writes, in
WORKDIR/eval/:

* `predictions/<name>.png`: the predicted gland mask, 0 = non-gland, 255 = gland (argmax of the
  averaged probabilities; with `eval.min_object_area` / `eval.max_hole_area` > 0, small gland
  objects removed and small holes filled, `inference.remove_small_regions`);
* `overlays/<name>.png`: the image with the gland contours of the prediction (green; with
  `eval.split_h` > 0 also the cuts between split glands) and of the ground truth (blue);
* `metrics.json`: pixel metrics (one dataset-wide confusion matrix) and GlaS object metrics for
  every split in `eval.splits` (default test, test_a, test_b; `oeem_jax.evaluation.metrics.evaluate_split`;
  `val` scores the validation carve-out, for choosing post-processing settings without the test
  set). Predicted objects are the 8-connected components of the mask, or with `eval.split_h` > 0
  those components with touching glands split (`oeem_jax.evaluation.metrics.split_instances`);
* `per_image.csv`: one row per image with its split.

The network is jitted once for a fixed window batch, so the number of compiles does not grow with
the number of images, their sizes or the scales.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np
from absl import logging

from oeem_jax.evaluation import inference, metrics
from oeem_jax.runtime import artifacts, io_utils

# Contour colours on the overlays (RGB).
PRED_COLOUR = (0, 255, 0)
TRUE_COLOUR = (0, 64, 255)


def overlay_contours(image: np.ndarray, pred: np.ndarray, gt_instances: np.ndarray,
                     split_h: int = 0) -> np.ndarray:
  """Draws gland contours of a prediction and of the ground truth on an image.

  Args:
    image: uint8[H, W, 3] RGB.
    pred: uint8/bool[H, W] binary prediction (1 = gland).
    gt_instances: int[H, W] ground-truth instance ids (0 = background).
    split_h: the prediction's objects are `metrics.split_instances(pred, split_h)` (0 = its
      8-connected components), so the cuts between split glands are drawn too.

  Returns:
    uint8[H, W, 3]: prediction boundaries in `PRED_COLOUR`, ground-truth instance boundaries in
    `TRUE_COLOUR` (drawn last, so they win where both meet).
  """
  from skimage.segmentation import find_boundaries

  out = np.array(image, dtype=np.uint8, copy=True)
  out[find_boundaries(metrics.split_instances(pred > 0, split_h), mode="inner")] = PRED_COLOUR
  out[find_boundaries(np.asarray(gt_instances), mode="inner")] = TRUE_COLOUR
  return out


def predict_split(apply_fn, examples, eval_cfg, out_dir: Path, normalize) -> dict[str, np.ndarray]:
  """Predicts every example; writes predictions/ and overlays/; returns name -> uint8[H, W] 0/1."""
  preds = {}
  scales = tuple(float(s) for s in eval_cfg.scales)
  for k, ex in enumerate(examples):
    probs = inference.predict_probs(
        apply_fn, ex.image, normalize=normalize, scales=scales, flip=bool(eval_cfg.flip),
        window=int(eval_cfg.window), stride=int(eval_cfg.stride), batch_size=int(eval_cfg.batch_size))
    pred = inference.remove_small_regions(
        np.argmax(probs, axis=-1), min_object_area=int(eval_cfg.min_object_area),
        max_hole_area=int(eval_cfg.max_hole_area))
    preds[ex.name] = pred
    artifacts.write_prediction(out_dir, ex.name, pred)
    if eval_cfg.overlays:
      io_utils.atomic_write_png(out_dir / "overlays" / f"{ex.name}.png",
                                overlay_contours(ex.image, pred, ex.mask,
                                                 int(eval_cfg.get("split_h", 0))))
    logging.log_every_n_seconds(logging.INFO, "eval: %d/%d images (%s)", 20, k + 1, len(examples),
                                ex.name)
  return preds


def score_splits(preds: dict[str, np.ndarray], split_examples: dict[str, Sequence[Any]],
                 splits: Sequence[str], *, split_h: int = 0
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Scores predictions per split: each image once, a split's metrics pool its images' counts
  (test = test_a + test_b; `metrics.pool_scores`).

  Args:
    preds: image name -> uint8/bool[H, W] 0/1 prediction, for every image of `splits`.
    split_examples: split name -> its `Example`s (`mask`: int[H, W] instance ids).
    splits: the splits to report, in order.
    split_h: predicted objects are `metrics.split_instances(pred, split_h)` (pixels; 0 = the
      8-connected components).

  Returns:
    (split -> {"pixel": ..., "object": ...} pooled metrics, per-image rows: one per image with the
    first (narrowest) split it appears in as "split").

  Raises:
    KeyError: an image of `splits` without a prediction; ValueError: see `metrics.score_image`.
  """
  scores = {}
  for s in splits:
    for ex in split_examples[s]:
      if ex.name not in scores:
        scores[ex.name] = metrics.score_image(preds[ex.name], ex.mask, ex.name, split_h=split_h)
  results, rows = {}, {}
  for s in splits:
    r = metrics.pool_scores([scores[e.name] for e in split_examples[s]])
    for row in r.pop("per_image"):
      rows.setdefault(row["name"], {"split": s, **row})  # an image's first (narrowest) split
    results[s] = r
  return results, list(rows.values())


def headline(results: dict[str, Any], *, synthetic: bool) -> str:
  """One short table (text) of the main metrics per split, for the end of a run."""
  lines = []
  if synthetic:
    lines.append("SYNTHETIC DATA: these numbers say nothing about GlaS accuracy.")
  lines.append(f"{'split':8s} {'mIoU':>7s} {'Dice':>7s} {'F1':>7s} {'objF1':>7s} {'objDice':>7s} "
               f"{'objHaus':>8s}")
  for split, r in results.items():
    p, o = r["pixel"], r["object"]
    lines.append(f"{split:8s} {100 * p['miou']:7.2f} {100 * p['dice']:7.2f} {100 * p['f1']:7.2f} "
                 f"{100 * o['f1']:7.2f} {100 * o['dice']:7.2f} {o['hausdorff']:8.2f}")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, stage_dir: Path) -> dict[str, Any]:
  """Runs the eval stage (see the module docstring); returns the summary fields.

  Raises:
    FileNotFoundError: no segmenter checkpoint (or network card) in `eval.seg_dir`.
    ValueError: an unknown split name in `eval.splits`, or a negative `eval.min_object_area` /
      `eval.max_hole_area` / `eval.split_h` (ConfigError naming the key).
  """
  from oeem_jax.data import loader
  from oeem_jax.engine.checkpoint import load_variables, params_digest
  from oeem_jax.models import segmenter_apply_fn
  from oeem_jax.models.network import trained_network

  eval_cfg = config.eval
  split_h = int(eval_cfg.get("split_h", 0))  # areas and split_h: checked by config.check.validate
  seg_dir = artifacts.upstream_dir(stage_dir, "seg", eval_cfg.seg_dir)
  variables, step = load_variables(seg_dir, eval_cfg.checkpoint)
  digest = params_digest(variables["params"])  # equals the training summary's for "latest"
  logging.info("eval: restored %s checkpoint of step %d from %s (params_digest %s)",
               eval_cfg.checkpoint, step, seg_dir, digest[:16])
  network = trained_network(seg_dir, "seg")
  normalize = network.normalize
  apply_fn = segmenter_apply_fn(network.model, variables)

  data = loader.load_splits(config.data)
  splits = [s.strip() for s in str(eval_cfg.splits).split(",") if s.strip()]
  for s in splits:
    if s not in data.splits:
      from oeem_jax.errors import ConfigError
      raise ConfigError("eval.splits", repr(eval_cfg.splits), "comma-separated names from " +
                        ", ".join(sorted(data.splits)))
  # Predict each image once, even when it belongs to several reported splits (test = a + b).
  wanted = {}
  for s in splits:
    for ex in data.splits[s]:
      wanted.setdefault(ex.name, ex)
  preds = predict_split(apply_fn, list(wanted.values()), eval_cfg, stage_dir, normalize)

  results, rows = score_splits(preds, data.splits, splits, split_h=split_h)
  io_utils.atomic_write_json(artifacts.eval_metrics_path(stage_dir), {
      "synthetic": data.synthetic, "source": data.source, "checkpoint_step": step,
      "checkpoint_dir": str(seg_dir), "split_h": split_h, "splits": results})
  metrics.write_per_image_csv(stage_dir / "per_image.csv", rows,
                              fields=("split",) + metrics.PER_IMAGE_FIELDS)
  table = headline(results, synthetic=data.synthetic)
  logging.info("eval results:\n%s", table)
  return {
      "synthetic": data.synthetic,
      "checkpoint_step": step,
      "checkpoint_params_digest": digest,
      "metrics": results,
      "predictions_dir": str(artifacts.predictions_dir(stage_dir)),
      "final_line": table,
  }
