"""The workdir layout and the files one stage writes for another, in one place.

A workdir holds one folder per stage, `WORKDIR/<stage>/` (`stage_dir`), each with the stage's
`summary.json` (`summary_path`; written by `oeem_jax.stages.run_stage`, its `config` key holds the
config the stage ran with). The hand-offs between stages:

* cls -> cam, seg: the classifier checkpoints in `WORKDIR/cls` (`oeem_jax.engine.checkpoint.load_variables`);
  the network is rebuilt from `WORKDIR/cls/network.json` (`write_network_card`,
  `read_network_card`: the constructor arguments, written when training starts).
* cam -> seg: pseudo-masks `WORKDIR/cam/pseudo_masks/<name>.png`, palette PNGs of the image's size
  with 0 = non-gland, 1 = gland, 255 = ignore (`write_pseudo_mask`, `read_pseudo_mask`; the CAM
  pseudo-masks of paper Eq. 1-2 that the segmenter trains on), plus 0/255 grey previews in
  `WORKDIR/cam/previews/`.
* seg -> eval, export, predict: the segmenter checkpoints in `WORKDIR/seg`, the network rebuilt from
  `WORKDIR/seg/network.json` (export also reads the finished stage's `summary.json`).
* export -> predict: the model folder `WORKDIR/export/model` (`exported_model_dir`; its content
  is `oeem_jax.predict.model_folder`'s).
* eval -> readers of its results: predictions `WORKDIR/eval/predictions/<name>.png`, grey PNGs with
  0 = non-gland, 255 = gland (`write_prediction`, `read_prediction`), and the metrics
  `WORKDIR/eval/metrics.json` (`eval_metrics_path`).

Every config key that names one of these folders (`cam.cls_dir`, `seg.pseudo_dir`, `eval.seg_dir`,
...) defaults to its place in the same workdir (`upstream_dir`). This module imports no JAX.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: importing this module needs no ml_collections
  import ml_collections

# Palette of the 0/1 pseudo-mask PNGs: 0 black, 1 white (so that viewers don't show "all black").
PSEUDO_MASK_PALETTE = [0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254
IGNORE = 255  # pseudo-mask value of an unsupervised pixel
NETWORK_CARD = "network.json"  # in a training stage folder (`network_card_path`)


def stage_dir(workdir: str | Path, stage: str) -> Path:
  """`WORKDIR/<stage>`: the folder of one stage's outputs."""
  return Path(workdir) / stage


def summary_path(workdir: str | Path, stage: str) -> Path:
  """`WORKDIR/<stage>/summary.json`, written when the stage finishes."""
  return stage_dir(workdir, stage) / "summary.json"


def upstream_dir(own_stage_dir: str | Path, stage: str, override: str | Path = "") -> Path:
  """The folder of another stage: `override` (a config key's value, `~` expanded) when set, else
  `<stage>` in the same workdir as `own_stage_dir` (= WORKDIR/<own stage>)."""
  if override:
    return Path(override).expanduser()
  return stage_dir(Path(own_stage_dir).parent, stage)


# ---- self-training rounds (seg)

ROUND_PREFIX = "round_"


def round_dir(stage_dir: str | Path, r: int, rounds: int) -> Path:
  """Where self-training round r of `rounds` extra rounds trains: WORKDIR/seg/round_<r> for the
  earlier rounds, WORKDIR/seg itself for the last (what eval and export read)."""
  return Path(stage_dir) if r == rounds else Path(stage_dir) / f"{ROUND_PREFIX}{r}"


def network_card_path(train_stage_dir: str | Path) -> Path:
  """`WORKDIR/<stage>/network.json` of a training stage (cls, seg): the network's constructor
  arguments and input normalisation (`oeem_jax.models.factory.network_card`), written when training
  starts, so that every checkpoint beside it can be rebuilt without the run's config."""
  return Path(train_stage_dir) / NETWORK_CARD


def write_network_card(train_stage_dir: str | Path, card: dict) -> Path:
  """Writes `network_card_path(train_stage_dir)` atomically (temp name, then rename)."""
  from oeem_jax.runtime import io_utils
  return io_utils.atomic_write_json(network_card_path(train_stage_dir), card)


def read_network_card(train_stage_dir: str | Path) -> dict | None:
  """The network card of a training stage folder, or None when it has none (a run of an older
  version: `training_config` then gives its config).

  Raises:
    ValueError: the file exists but is not a JSON object (the message names it).
  """
  import json

  path = network_card_path(train_stage_dir)
  if not path.is_file():
    return None
  try:
    with open(path) as f:
      card = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: unreadable network card ({type(e).__name__}: {e}); expected the JSON "
                     "file the training stage wrote") from e
  if not isinstance(card, dict):
    raise ValueError(f"{path}: expected a JSON object (a network card), got {type(card).__name__}")
  return card


def training_config(train_stage_dir: str | Path) -> ml_collections.ConfigDict | None:
  """The config a finished training stage ran with (the `config` of its summary.json), or None when
  the stage has no summary.json. Networks are rebuilt from the network card
  (`network.trained_network`), which falls back to this for older runs without one; tools that need
  the stage's other keys (data, crop, pseudo-mask folder; e.g. launch/analyse_oeem.py) read them here.

  Raises:
    json.JSONDecodeError / KeyError: a summary.json that is not a stage summary.
  """
  import json

  import ml_collections

  path = Path(train_stage_dir) / "summary.json"
  if not path.is_file():
    return None
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f)["config"])


def exported_model_dir(export_dir: str | Path) -> Path:
  """`WORKDIR/export/model` for `export_dir` = WORKDIR/export: the default model folder."""
  return Path(export_dir) / "model"


# ---- pseudo-masks (cam -> seg)

def pseudo_mask_dir(cam_dir: str | Path) -> Path:
  """`WORKDIR/cam/pseudo_masks` for `cam_dir` = WORKDIR/cam."""
  return Path(cam_dir) / "pseudo_masks"


def preview_dir(cam_dir: str | Path) -> Path:
  """`WORKDIR/cam/previews`: the pseudo-masks as 0/255 grey PNGs, for viewing."""
  return Path(cam_dir) / "previews"


def mask_file(folder: str | Path, name: str) -> Path:
  """`<folder>/<name>.png`: the file of image `name` in a pseudo-mask or prediction folder."""
  return Path(folder) / f"{name}.png"


def write_pseudo_mask(cam_dir: str | Path, name: str, mask: np.ndarray) -> Path:
  """Writes the pseudo-mask of image `name` (palette PNG) and its preview (0/255 grey), atomically.

  Args:
    cam_dir: WORKDIR/cam.
    name: the image name (file stem).
    mask: uint8[H, W] with 0 = non-gland, 1 = gland (255 = ignore).

  Returns:
    The pseudo-mask's path.

  Raises:
    ValueError: `mask` is not a 2-D uint8 array.
  """
  from oeem_jax.runtime import io_utils

  path = io_utils.atomic_write_png(mask_file(pseudo_mask_dir(cam_dir), name), mask,
                                   palette=PSEUDO_MASK_PALETTE)
  io_utils.atomic_write_png(mask_file(preview_dir(cam_dir), name), mask * np.uint8(255))
  return path


def read_pseudo_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
  """Reads a pseudo-mask PNG (palette or greyscale, values 0/1, 255 = ignore) -> uint8[H, W].

  Args:
    path: the PNG (`mask_file(folder, name)`).
    shape: (H, W) of its image, in pixels.

  Raises:
    FileNotFoundError: missing file (message says how to make it).
    ValueError: wrong size, or values other than 0, 1, 255.
  """
  from PIL import Image

  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f"pseudo-mask {path} not found: run stage cam first (configs/cam.py, same --workdir), set "
        "config key seg.pseudo_dir to the folder of <name>.png masks, or use seg.mask_source='true'")
  with Image.open(path) as im:
    mask = np.asarray(im.convert("L") if im.mode not in ("P", "L") else im)
  if mask.shape != tuple(shape):
    raise ValueError(f"pseudo-mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH), the image is "
                     f"{shape[1]}x{shape[0]}")
  bad = (mask != 0) & (mask != 1) & (mask != IGNORE)
  if bad.any():
    raise ValueError(f"pseudo-mask {path} holds values {[int(v) for v in np.unique(mask[bad])[:5]]}; expected "
                     "0 (non-gland), 1 (gland) or 255 (ignore)")
  return mask.astype(np.uint8)


# ---- predictions (eval -> rescoring)

def eval_metrics_path(eval_dir: str | Path) -> Path:
  """`WORKDIR/eval/metrics.json`: the pooled metrics of every scored split."""
  return Path(eval_dir) / "metrics.json"


def predictions_dir(eval_dir: str | Path) -> Path:
  """`WORKDIR/eval/predictions` for `eval_dir` = WORKDIR/eval."""
  return Path(eval_dir) / "predictions"


def write_prediction(eval_dir: str | Path, name: str, pred: np.ndarray) -> Path:
  """Writes the predicted gland mask of image `name` as a 0/255 grey PNG, atomically.

  Args:
    eval_dir: WORKDIR/eval.
    name: the image name (file stem).
    pred: uint8[H, W] with 0 = non-gland, 1 = gland.

  Returns:
    The file's path.

  Raises:
    ValueError: `pred` is not a 2-D uint8 array.
  """
  from oeem_jax.runtime import io_utils

  return io_utils.atomic_write_png(mask_file(predictions_dir(eval_dir), name), pred * np.uint8(255))


def read_prediction(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
  """Reads a prediction PNG (what `write_prediction` writes) -> uint8[H, W] with values 0/1.

  Args:
    path: the PNG (`mask_file(folder, name)`).
    shape: (H, W) of its image, in pixels.

  Raises:
    FileNotFoundError: missing file.
    ValueError: its size is not `shape`.
  """
  from PIL import Image

  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no prediction for test image {path.stem}")
  with Image.open(path) as im:
    pred = np.asarray(im)
  if pred.shape != tuple(shape):
    raise ValueError(f"{path}: prediction {pred.shape} but image {path.stem} is {tuple(shape)}")
  return (pred > 0).astype(np.uint8)
