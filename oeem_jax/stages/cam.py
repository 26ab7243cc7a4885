"""Stage `cam`: classifier CAMs -> full-image pseudo-masks of the training images (paper Eq. 1-2).

Restores the classifier checkpoint (orbax; `cam.checkpoint`, default the best by validation CAM
mIoU) from `cam.cls_dir` (default WORKDIR/cls). For every image of `cam.splits` (default all 85
training images: train + val) it cuts the 112/56 tile grid, computes each tile's multi-scale CAM
(`cam.scales`, default 1, 1.25, 1.5, 1.75, 2; docs/reference.md §3), suppresses the classes absent from
the tile's patch label, takes the argmax and stitches the tiles back (ties to non-gland): by majority
vote of the tiles' masks (`cam.stitch = "vote"`, the reference) or, "soft", by the mean of their
label-masked softmax(CAM / `cam.stitch_temperature`) probabilities. Outputs,
in WORKDIR/cam/:

* `pseudo_masks/<name>.png`: palette PNG, 0 = non-gland, 1 = gland (what the seg stage reads);
* `previews/<name>.png`: the same mask as 0/255 grey, for viewing;
* in summary.json: `cam_miou` (argmax of the multi-scale CAM without label suppression) and
  `pseudo_mask_miou` (with suppression) against the true masks of the same images: the paper's
  Table 2 columns "CAM" and "Pseudo-mask" (67.92 / 70.04 with ImageNet initialisation).

Tiles go through one jitted function of fixed batch shape, so it compiles once for all images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from oeem_jax.data import tiles as tiles_lib
from oeem_jax.evaluation import metrics
from oeem_jax.method import pseudo_mask
from oeem_jax.runtime import artifacts


def _select_examples(data, splits: str) -> tuple[list[str], list]:
  """(split names, their examples in order) of `cam.splits` (comma-separated).

  Raises:
    errors.ConfigError: a name that is not a split of `data`.
  """
  names = [s.strip() for s in splits.split(",") if s.strip()]
  examples = []
  for s in names:
    if s not in data.splits:
      from oeem_jax.errors import ConfigError
      raise ConfigError("cam.splits", repr(splits), "comma-separated names from " +
                        ", ".join(sorted(data.splits)))
    examples.extend(data.splits[s])
  return names, examples


def run(config: ml_collections.ConfigDict, stage_dir: Path) -> dict[str, Any]:
  """Runs the cam stage (module docstring); returns the summary fields.

  Raises:
    FileNotFoundError: no classifier checkpoint (or network card) in `cam.cls_dir`.
    ValueError: an unknown split name in `cam.splits`.
  """
  import jax

  from oeem_jax.data import loader
  from oeem_jax.engine.checkpoint import load_variables
  from oeem_jax.models.classifier import CAMClassifier
  from oeem_jax.models.network import trained_network

  cam_cfg, data_cfg = config.cam, config.data
  cls_dir = artifacts.upstream_dir(stage_dir, "cls", cam_cfg.cls_dir)
  variables, step = load_variables(cls_dir, cam_cfg.checkpoint)
  logging.info("cam: restored %s classifier checkpoint of step %d from %s", cam_cfg.checkpoint, step,
               cls_dir)
  network = trained_network(cls_dir, "cls")
  model, normalize = network.model, network.normalize
  variables = jax.device_put(variables)

  def cam_fn(params, x):
    return model.apply(params, x, method=CAMClassifier.cam)

  data = loader.load_splits(data_cfg)
  names, examples = _select_examples(data, str(cam_cfg.splits))

  tile, stride = int(data_cfg.tile_size), int(data_cfg.tile_stride)
  scales = tuple(float(s) for s in cam_cfg.scales)
  stitch = str(cam_cfg.stitch)  # checked with the config (config.check: cam.stitch)
  temperature = float(cam_cfg.stitch_temperature) if stitch == "soft" else None
  conf_cam = np.zeros((2, 2), np.int64)
  conf_pseudo = np.zeros((2, 2), np.int64)
  per_image = []
  for k, ex in enumerate(examples):
    h, w = ex.mask.shape
    boxes = tiles_lib.tile_boxes(h, w, tile, stride)
    img_tiles, labels = tiles_lib.example_tiles(ex, tile, stride, float(data_cfg.label_threshold))
    masked, unmasked = pseudo_mask.tile_pseudo_masks(
        img_tiles, labels, cam_fn, cam_params=variables, batch_size=int(cam_cfg.batch_size),
        scales=scales, cam_input=network.input_size, return_unmasked=True,
        normalize=normalize, temperature=temperature)
    pseudo = tiles_lib.stitch(masked, boxes, h, w, stitch)
    cam_mask = tiles_lib.stitch(unmasked, boxes, h, w, stitch)
    truth = (ex.mask > 0).astype(np.int64)
    c_pseudo = metrics.confusion_matrix(pseudo, truth)
    conf_pseudo += c_pseudo
    conf_cam += metrics.confusion_matrix(cam_mask, truth)
    per_image.append({"name": ex.name, "pseudo_mask_miou": metrics.pixel_metrics(c_pseudo)["miou"]})
    artifacts.write_pseudo_mask(stage_dir, ex.name, pseudo)
    logging.log_every_n_seconds(logging.INFO, "cam: %d/%d images (%s, %d tiles)", 20, k + 1,
                                len(examples), ex.name, len(boxes))

  cam_pm = metrics.pixel_metrics(conf_cam)
  pseudo_pm = metrics.pixel_metrics(conf_pseudo)
  label = " (SYNTHETIC data)" if data.synthetic else ""
  line = (f"cam{label}: {len(examples)} pseudo-masks in {artifacts.pseudo_mask_dir(stage_dir)}; "
          f"CAM mIoU {100 * cam_pm['miou']:.2f}, pseudo-mask mIoU {100 * pseudo_pm['miou']:.2f} "
          f"(paper Table 2: 67.92 / 70.04)")
  logging.info("%s", line)
  return {
      "synthetic": data.synthetic,
      "checkpoint_step": step,
      "num_images": len(examples),
      "splits": names,
      "cam_miou": cam_pm["miou"],
      "pseudo_mask_miou": pseudo_pm["miou"],
      "cam_pixel_metrics": cam_pm,
      "pseudo_mask_pixel_metrics": pseudo_pm,
      "per_image": per_image,
      "pseudo_mask_dir": str(artifacts.pseudo_mask_dir(stage_dir)),
      "final_line": line,
  }
