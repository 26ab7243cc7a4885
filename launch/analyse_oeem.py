r"""Where does the segmentation loss fall: on pixels the pseudo-mask gets right, or wrong?

    python launch/analyse_oeem.py --seg_dir=runs/x/seg --data_dir=../shared/data/glas \
        --out=runs/x/oeem_analysis [--kinds=ce,oeem] [--images=val] [--panels=4]

Takes a trained segmenter (a finished stage `seg`), its pseudo-masks (the folder the stage trained
on, from its summary.json, or `--pseudo_dir`) and the true masks of the chosen images (default:
the stage's validation images, which it never trained on). For each image it predicts logits
single-scale with the stage's validation window, cuts the image into the stage's training crops
(crop x crop tiles; the edge is padded with ignored pixels) and computes per tile, as training
does per crop, the weight map W of each loss kind (`oeem_jax.method.losses.loss_weights`, paper Eq. 3-8)
and the CE map L against the pseudo-mask. The true masks then split the pixels into right and
wrong pseudo-labels and `losses.loss_share_on_label_errors` reports, pooled over the images:
the fraction of wrong labels, the share of the loss sum(W*L) on them, and the mean weight on
right and on wrong pixels. If OEEM does what the paper says (§2.2), its share on wrong labels is
below plain CE's.

Writes `--out`/analysis.json and, for the first `--panels` images, PNG panels (one row per
image): image | pseudo-label right (green) / wrong (red) / ignored (grey) | CE map | OEEM weight
map (both as grey levels, scale in the JSON). Prints the table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import app, flags, logging

_SEG_DIR = flags.DEFINE_string("seg_dir", None, "a finished stage-seg folder (W/seg)", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "GlaS folder (as --config.data.dir)", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder", required=True)
_PSEUDO_DIR = flags.DEFINE_string("pseudo_dir", "", "pseudo-masks (default: what the stage trained on)")
_KINDS = flags.DEFINE_list("kinds", ["ce", "oeem"], "loss kinds to weigh (oeem_jax.method.losses.KINDS)")
_IMAGES = flags.DEFINE_string("images", "val", "split name (val, train, test_a, ...) or comma list of names")
_PANELS = flags.DEFINE_integer("panels", 4, "images drawn as PNG panels")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number")


def _tiles(x: np.ndarray, crop: int, fill) -> np.ndarray:
  """[H, W, ...] -> [T, crop, crop, ...], padded with `fill` to multiples of crop."""
  h, w = x.shape[:2]
  ph, pw = -(-h // crop) * crop, -(-w // crop) * crop
  pad = [(0, ph - h), (0, pw - w)] + [(0, 0)] * (x.ndim - 2)
  x = np.pad(x, pad, constant_values=fill)
  x = x.reshape(ph // crop, crop, pw // crop, crop, *x.shape[2:]).swapaxes(1, 2)
  return x.reshape(-1, crop, crop, *x.shape[4:])


def _untile(t: np.ndarray, h: int, w: int) -> np.ndarray:
  crop = t.shape[1]
  gh, gw = -(-h // crop), -(-w // crop)
  x = t.reshape(gh, gw, crop, crop, *t.shape[3:]).swapaxes(1, 2)
  return x.reshape(gh * crop, gw * crop, *t.shape[3:])[:h, :w]


def _grey(x: np.ndarray, top: float) -> np.ndarray:
  g = np.clip(x / max(top, 1e-12), 0, 1) * 255
  return np.repeat(g.astype(np.uint8)[..., None], 3, axis=-1)


def main(argv):
  del argv
  import jax.numpy as jnp

  from oeem_jax.data import loader
  from oeem_jax.engine.checkpoint import load_variables
  from oeem_jax.evaluation import inference
  from oeem_jax.method import losses
  from oeem_jax.models import segmenter_apply_fn
  from oeem_jax.models.network import trained_network
  from oeem_jax.runtime import artifacts, io_utils
  from oeem_jax.stages import seg

  seg_dir = Path(_SEG_DIR.value)
  if not (seg_dir / "summary.json").is_file():
    raise app.UsageError(f"--seg_dir: {seg_dir}/summary.json not found (not a finished stage seg)")
  for k in _KINDS.value:
    if k not in losses.KINDS:
      raise app.UsageError(f"--kinds: {k!r} is not one of {losses.KINDS}")
  config = artifacts.training_config(seg_dir)
  config.data.dir = _DATA_DIR.value
  which = _CHECKPOINT.value if _CHECKPOINT.value in ("latest", "best") else int(_CHECKPOINT.value)
  variables, step = load_variables(seg_dir, which)
  network = trained_network(seg_dir, "seg")  # the network card, as stage eval rebuilds it
  apply_fn = segmenter_apply_fn(network.model, variables)
  normalize = network.normalize
  crop = int(config.seg.crop_size)
  window, stride = int(config.seg.eval_window), int(config.seg.eval_stride)

  data = loader.load_splits(config.data)
  if _IMAGES.value in data.splits:
    examples = data.splits[_IMAGES.value]
  else:
    names = {n.strip() for n in _IMAGES.value.split(",")}
    examples = [e for s in ("train", "val", "test_a", "test_b") for e in data.splits[s] if e.name in names]
    if len(examples) != len(names):
      raise app.UsageError(f"--images: not found: {sorted(names - {e.name for e in examples})}")
  pseudo_dir = Path(_PSEUDO_DIR.value) if _PSEUDO_DIR.value else seg.pseudo_dir(config, seg_dir)
  logging.info("analyse_oeem: %d images, model %s step %d, crops %d, pseudo-masks %s",
               len(examples), seg_dir, step, crop, pseudo_dir)

  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  pooled = {k: {"weights": [], "ce": [], "labels": [], "truth": []} for k in _KINDS.value}
  rows, per_image = [], []
  ce_top = 4.0
  for i, ex in enumerate(examples):
    h, w = ex.image.shape[:2]
    logits = inference.sliding_window_logits(apply_fn, normalize(ex.image), window=window,
                                              stride=stride)
    labels = artifacts.read_pseudo_mask(artifacts.mask_file(pseudo_dir, ex.name), (h, w))
    truth = (ex.mask > 0).astype(np.uint8)
    z, y = jnp.asarray(_tiles(logits, crop, 0.0)), jnp.asarray(_tiles(labels, crop, 255).astype(np.int32))
    ce = np.asarray(losses.cross_entropy_map(z, y))
    t = _tiles(truth, crop, 0)
    maps = {}
    for k in _KINDS.value:
      wk = np.asarray(losses.loss_weights(z, y, k))
      maps[k] = wk
      for key, v in (("weights", wk), ("ce", ce), ("labels", np.asarray(y)), ("truth", t)):
        pooled[k][key].append(v)
      per_image.append({"name": ex.name, "kind": k,
                        **losses.loss_share_on_label_errors(wk, ce, np.asarray(y), t)})
    if i < _PANELS.value:
      status = np.full((h, w, 3), 128, np.uint8)
      status[(labels != 255) & (labels == truth)] = (40, 170, 40)
      status[(labels != 255) & (labels != truth)] = (220, 40, 40)
      wmap = _untile(maps.get("oeem", maps[_KINDS.value[-1]]), h, w)
      rows.append(np.concatenate([ex.image, status, _grey(_untile(ce, h, w), ce_top),
                                  _grey(wmap, 3.0)], axis=1))
  if rows:
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, [(0, 0), (0, width - r.shape[1]), (0, 0)]) for r in rows])
    io_utils.atomic_write_png(out / "panels.png", grid)

  summary = {}
  for k, p in pooled.items():
    summary[k] = losses.loss_share_on_label_errors(*(np.concatenate(p[key]) for key in
                                                     ("weights", "ce", "labels", "truth")))
  result = {"seg_dir": str(seg_dir), "checkpoint_step": step, "images": [e.name for e in examples],
            "crop": crop, "panel_scales": {"ce_white_at": ce_top, "weight_white_at": 3.0},
            "pooled": summary, "per_image": per_image}
  io_utils.atomic_write_json(out / "analysis.json", result)
  lines = [f"{'kind':8s} {'wrong px':>9s} {'loss on wrong':>14s} {'CE on wrong':>12s} "
           f"{'mean W right':>13s} {'mean W wrong':>13s}"]
  for k, s in summary.items():
    lines.append(f"{k:8s} {100 * s['wrong_pixel_fraction']:8.2f}% {100 * s['loss_share_wrong']:13.2f}% "
                 f"{100 * s['ce_share_wrong']:11.2f}% {s['mean_weight_right']:13.3f} "
                 f"{s['mean_weight_wrong']:13.3f}")
  print("\n".join(lines))
  print(f"written: {out / 'analysis.json'}" + (f", {out / 'panels.png'}" if rows else ""))


if __name__ == "__main__":
  app.run(main)
