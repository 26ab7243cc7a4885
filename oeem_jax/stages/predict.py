r"""Stage `predict`: gland masks, measurements and QuPath annotations for a user's own images.

    python -m oeem_jax.main --config=configs/predict.py --config.predict.model=M \
        --config.predict.inputs=PATH --workdir=OUT

`predict.model`: a model folder from stage `export` (W/export/model) or a workdir with a finished
seg stage (`oeem_jax.predict.model_folder.load_model`). `predict.inputs`: a file, a folder or a glob of PNG,
JPEG, BMP or TIFF images (`oeem_jax.predict.images`). For each image, under OUT/predict/:

* `masks/<name>.png` (0 = non-gland, 255 = gland), or `masks/<name>.tif` (tiled, Deflate, with the
  resolution tags when the pixel size is known) for images above `predict.tiff_mask_pixels`;
* `overlays/<name>.png`: the image with the gland contours, downsampled by an integer factor to at
  most `predict.overlay_max_side` px a side;
* `annotations/<name>.geojson`: one QuPath annotation per gland (`oeem_jax.predict.glands`), in
  full-resolution pixel coordinates, origin top-left (QuPath: File > Import objects);
* `glands/<name>.csv`: one row per gland (area, perimeter, centroid, bounding box, eccentricity,
  solidity; µm and µm² when the pixel size is known);
* `records/<name>.json`: the image's record (size, pixel size, rescaling, gland count and area
  fraction, stain check, outputs), written last: a rerun skips an image whose record matches the
  same input file, model and settings.

`summary.json` lists every image's record and every failure. Prediction is region by region
(`oeem_jax.predict.regions`), the inference of stage `eval` (one compile for all regions and images), then
the post-processing of `eval` (`inference.remove_small_regions`). A bad file in a folder is
reported and skipped; the others are predicted and the command exits with status 2 at the end.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from oeem_jax.errors import InputError
from oeem_jax.evaluation import inference
from oeem_jax.predict import glands, images, regions, stain, tissue
from oeem_jax.runtime import io_utils

SETTING_KEYS = ("scales", "flip", "window", "stride", "batch_size", "min_object_area",
                "max_hole_area", "split_h")
# Values of settings that model cards written before the key existed lack (same results as then).
CARD_DEFAULTS = {"split_h": 0}
FAILED_EXIT_STATUS = 2


def inference_settings(cfg: ml_collections.ConfigDict, card: dict[str, Any]) -> dict[str, Any]:
  """The inference settings: each `predict.<key>` that is set, else the model card's (for a key
  older model cards lack, `CARD_DEFAULTS`).

  Raises:
    InputError: a value out of range (named by its config key).
  """
  rec = card["inference"]
  out = {}
  for key in SETTING_KEYS:
    value = cfg.get(key)
    out[key] = rec.get(key, CARD_DEFAULTS.get(key)) if value is None else value
    if out[key] is None:
      raise InputError(f"config key predict.{key} is unset and the model card has no value for it")
  out["scales"] = [float(s) for s in (out["scales"] if isinstance(out["scales"], (list, tuple))
                                      else [out["scales"]])]
  out["flip"] = bool(out["flip"])
  for key in ("window", "stride", "batch_size", "min_object_area", "max_hole_area", "split_h"):
    out[key] = int(out[key])
  if not out["scales"] or min(out["scales"]) <= 0:
    raise InputError(f"config key predict.scales is {out['scales']}; expected one or more positive "
                     "ratios, e.g. (1.0,)")
  if out["window"] < 8:
    raise InputError(f"config key predict.window is {out['window']}; expected a window side >= 8 px")
  if not 1 <= out["stride"] <= out["window"]:
    raise InputError(f"config key predict.stride is {out['stride']}; expected 1 .. window "
                     f"({out['window']}) px")
  if out["batch_size"] < 1:
    raise InputError(f"config key predict.batch_size is {out['batch_size']}; expected >= 1")
  for key in ("min_object_area", "max_hole_area"):
    if out[key] < 0:
      raise InputError(f"config key predict.{key} is {out[key]}; expected an area in pixels >= 0 "
                       "(0 = off)")
  if out["split_h"] < 0:
    raise InputError(f"config key predict.split_h is {out['split_h']}; expected a distance in pixels "
                     ">= 0 (0 = no splitting of touching glands)")
  return out


def detect_tissue(src: images.ImageSource, mpp: float | None, settings: dict[str, Any],
                  rescale: float, cfg: ml_collections.ConfigDict, name: str
                  ) -> tuple[tissue.WindowFilter | None, dict[str, Any]]:
  """Tissue detection for one image as `predict.tissue_detection` asks ("on"; "off"; "auto": on
  for images of more than `predict.tiff_mask_pixels` pixels, i.e. slides, off for fields of view).

  A thumbnail at about `tissue.THUMBNAIL_MPP` µm/px is read in strips, `tissue.tissue_mask` finds
  the tissue, and the returned filter keeps every window within one window (at the smallest
  effective scale, `regions.region_margin`) of it: pixels inside the tissue mask get exactly the
  prediction they would get without detection.

  Returns:
    (the `tissue.WindowFilter`, or None when detection is off; the record's "tissue" entry).
  """
  mode = str(cfg.tissue_detection)
  h, w = src.height, src.width
  if mode == "off" or (mode == "auto" and h * w <= int(cfg.tiff_mask_pixels)):
    why = "predict.tissue_detection = 'off'" if mode == "off" else \
        f"'auto': not a slide ({h * w} px <= predict.tiff_mask_pixels)"
    return None, {"used": False, "reason": why}
  start = time.time()
  factor = tissue.thumbnail_factor(mpp)
  thumb = tissue.read_thumbnail(src.read, h, w, factor)
  found = tissue.tissue_mask(thumb, downsample=(float(factor), float(factor)), mpp=mpp)
  margin = regions.region_margin(settings["window"], settings["scales"], rescale)
  rec = {"used": True, **found.record(), "margin_px": margin,
         "seconds": round(time.time() - start, 3)}
  logging.info("predict %s: tissue detection on a %dx%d thumbnail (1/%d): %.1f %% tissue "
               "(saturation threshold %.3f), %.1f s", name, thumb.shape[1], thumb.shape[0], factor,
               100 * found.fraction, found.threshold, rec["seconds"])
  return tissue.WindowFilter(found, h, w, margin=margin), rec


def split_h_input(split_h: int, rescale: float) -> int:
  """`split_h` (model pixels, a length) in input pixels: split_h / rescale rounded, at least 1 when
  split_h > 0 (so a coarse input does not turn the splitting off)."""
  if split_h <= 0:
    return 0
  return max(1, int(round(split_h / rescale)))


def pixel_size(source: images.ImageSource, input_mpp: float) -> images.PixelSize:
  """The input's pixel size: `predict.input_mpp` when > 0 (a file value that differs by more than
  5 % is noted), else the file's (`ImageSource.pixel_size`)."""
  from_file = source.pixel_size
  if input_mpp > 0:
    note = ""
    if from_file.mpp and abs(from_file.mpp - input_mpp) > 0.05 * input_mpp:
      note = (f"predict.input_mpp = {input_mpp:g} µm/px overrides the file's {from_file.mpp:.4g} "
              f"µm/px ({from_file.source})")
    return images.PixelSize(float(input_mpp), "config", note)
  return from_file


def _write_mask(path_png: Path, path_tif: Path, mask: np.ndarray, large: bool,
                mpp: float | None) -> Path:
  """Writes the 0/255 mask as PNG, or (large) as a tiled Deflate TIFF streamed tile by tile."""
  if not large:
    io_utils.atomic_write_png(path_png, mask * np.uint8(255))
    path_tif.unlink(missing_ok=True)
    return path_png
  import tifffile

  tile = 512
  h, w = mask.shape

  def tiles():
    for y in range(0, h, tile):
      for x in range(0, w, tile):
        t = np.zeros((tile, tile), np.uint8)
        part = mask[y:y + tile, x:x + tile]
        t[:part.shape[0], :part.shape[1]] = part * np.uint8(255)
        yield t

  extra = {}
  if mpp:
    extra = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
  with io_utils.atomic_path(path_tif) as tmp:
    tifffile.imwrite(tmp, tiles(), shape=(h, w), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib", photometric="minisblack", bigtiff=h * w > 2**31,
                     **extra)
  path_png.unlink(missing_ok=True)
  return path_tif


# Overlay contours: eval's prediction colour, 2 px wide (find_boundaries "thick") to stay visible.
OVERLAY_COLOUR = (0, 255, 0)


def split_cuts(labels: np.ndarray) -> np.ndarray:
  """Pixels on a cut between two touching glands of a split labelling.

  Args:
    labels: int[H, W] gland ids (0 = background), e.g. `glands.label(mask, split_h)`.

  Returns:
    bool[H, W]: True where a gland pixel has a 4-neighbour of another gland id (both sides of each
    cut). All False for 8-connected components (split_h 0), whose glands never touch.
  """
  lab = np.asarray(labels)
  cut = np.zeros(lab.shape, bool)
  for a, b in (((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
               ((slice(None), slice(1, None)), (slice(None), slice(None, -1)))):
    diff = (lab[a] != lab[b]) & (lab[a] > 0) & (lab[b] > 0)
    cut[a] |= diff
    cut[b] |= diff
  return cut


def overlay_and_stain(source: images.ImageSource, mask: np.ndarray, factor: int,
                      colour=OVERLAY_COLOUR, labels: np.ndarray | None = None
                      ) -> tuple[np.ndarray, stain.Accumulator]:
  """One pass over the image: the overlay and the stain feature.

  Args:
    source: the image.
    mask: uint8/bool[H, W] final gland mask.
    factor: integer downsampling of the overlay (1 = full size).
    colour: contour colour (RGB).
    labels: optional int32[H, W] gland ids of `mask` (`glands.label(mask, split_h)`): the cuts
      between split glands (`split_cuts`) are drawn too, as in eval's overlays. None = the
      components' contours only.

  Returns:
    (uint8[H // factor, W // factor, 3] image (block means) with the contours of the gland
    components (`skimage.segmentation.find_boundaries`, "thick": the pixels on both sides of each
    gland border) and the cuts of `labels` (at factor > 1 sampled at each block's centre pixel) in
    `colour`, the stain accumulator over the whole image).
  """
  from skimage.segmentation import find_boundaries
  from skimage.transform import downscale_local_mean

  h, w = source.height, source.width
  acc = stain.Accumulator()
  if factor == 1:
    image = source.read(0, h, 0, w)
    acc.add(image)
    out = np.array(image, np.uint8, copy=True)
    # Thick boundaries of the split ids = the components' contours plus both sides of each cut.
    out[find_boundaries(glands.label(mask) if labels is None else labels, mode="thick")] = colour
    return out, acc
  oh, ow = max(1, h // factor), max(1, w // factor)
  out = np.zeros((oh, ow, 3), np.uint8)
  small = np.zeros((oh, ow), bool)
  rows = max(1, min(64, (64 * 2**20) // (factor * factor * w * 3)))  # output rows per strip
  y_end = 0
  for oy in range(0, oh, rows):
    oy1 = min(oh, oy + rows)
    y0, y1 = oy * factor, min(h, oy1 * factor)
    strip = source.read(y0, y1, 0, w)
    acc.add(strip, y0, 0)
    bh, bw = (oy1 - oy) * factor, ow * factor
    block = strip[:bh, :bw]
    if block.shape[0] < bh or block.shape[1] < bw:  # an image smaller than the factor
      block = np.pad(block, ((0, bh - block.shape[0]), (0, bw - block.shape[1]), (0, 0)), mode="edge")
    out[oy:oy1] = np.clip(np.rint(downscale_local_mean(block, (factor, factor, 1))), 0, 255)
    mblock = mask[y0:y0 + bh, :bw] > 0
    if mblock.shape != (bh, bw):
      mblock = np.pad(mblock, ((0, bh - mblock.shape[0]), (0, bw - mblock.shape[1])))
    small[oy:oy1] = downscale_local_mean(mblock, (factor, factor)) >= 0.5
    y_end = y1
  if y_end < h:  # rows below the last whole block still count for the stain feature
    acc.add(source.read(y_end, h, 0, w), y_end, 0)
  out[find_boundaries(glands.label(small), mode="thick")] = colour
  if labels is not None:
    c = factor // 2  # the centre pixel of each block (the last row/column of blocks may be partial)
    sampled = np.zeros((oh, ow), np.int64)
    part = np.asarray(labels)[c::factor, c::factor][:oh, :ow]
    sampled[:part.shape[0], :part.shape[1]] = part
    out[split_cuts(sampled) & small] = colour
  return out, acc


def _identity(path: Path, name: str, loaded, settings: dict[str, Any],
              cfg: ml_collections.ConfigDict) -> str:
  st = path.stat()
  ident = {"input": str(path.resolve()), "name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "params_digest": loaded.card["provenance"]["params_digest"], "settings": settings,
           "pixel_size_um": loaded.card.get("pixel_size_um"),
           **{k: cfg[k] for k in ("input_mpp", "region_size", "align_regions", "overlay_max_side",
                                  "tiff_mask_pixels", "tissue_detection",
                                  "simplify_px", "stain_check", "stain_z_max")}}
  return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def predict_file(loaded, apply_fn, path: Path, name: str, settings: dict[str, Any],
                 cfg: ml_collections.ConfigDict, out_dir: Path) -> dict[str, Any]:
  """Predicts one image and writes its outputs (module docstring); returns its record.

  Raises:
    InputError: the file cannot be read (nothing of this image is written then).
  """
  start = time.time()
  model_mpp = loaded.card.get("pixel_size_um")
  with images.open_image(path) as src:
    h, w = src.height, src.width
    px = pixel_size(src, float(cfg.input_mpp))
    notes = list(src.notes) + ([px.note] if px.note else [])
    if px.mpp and model_mpp:
      rescale = px.mpp / model_mpp
      how = (f"input {px.mpp:.4g} µm/px ({px.source}), model {model_mpp:.4g} µm/px: predicted at "
             f"{rescale:.4g} x the input size, outputs at the input size")
    else:
      rescale = 1.0
      missing = " and ".join(s for s, v in (("the input's", px.mpp), ("the model's", model_mpp)) if not v)
      how = f"no rescaling: {missing} pixel size is unknown (set predict.input_mpp if it is known)"
      notes.append(how)
    logging.info("predict %s: %dx%d px (WxH), %s; %s", name, w, h, src.description, how)
    window_filter, tissue_rec = detect_tissue(src, px.mpp, settings, rescale, cfg, name)
    if tissue_rec.get("fraction") == 0.0:
      notes.append("no tissue found (tissue detection): the mask is empty")
    stats: dict[str, int] = {}
    mask = regions.predict_mask(
        apply_fn, src.read, h, w, normalize=loaded.normalize, scales=settings["scales"],
        flip=settings["flip"], window=settings["window"], stride=settings["stride"],
        batch_size=settings["batch_size"], rescale=rescale, region_size=int(cfg.region_size),
        align=bool(cfg.align_regions), name=name, tissue=window_filter,
        num_classes=int(loaded.card["network"]["seg"]["num_classes"]), stats=stats)
    if window_filter is not None:
      tissue_rec.update(stats)
      tissue_rec["windows_skipped_fraction"] = round(stats["windows_skipped"] / stats["windows"], 6) \
          if stats["windows"] else 1.0
      logging.info("predict %s: tissue detection skipped %d of %d windows (%.1f %%) and %d "
                   "regions of glass only", name, stats["windows_skipped"], stats["windows"],
                   100 * tissue_rec["windows_skipped_fraction"], stats["regions_skipped"])
    step = (regions.region_align(settings["stride"], settings["scales"], rescale)
            if cfg.align_regions else settings["stride"])
    num_regions = len(regions.plan_regions(
        h, w, region_size=int(cfg.region_size), align=step,
        margin=regions.region_margin(settings["window"], settings["scales"], rescale)))
    # Post-processing areas are in model pixels (as in eval); in input pixels they scale by 1/r².
    areas = {k: int(round(settings[k] / (rescale * rescale))) for k in ("min_object_area", "max_hole_area")}
    if areas["min_object_area"] > 0 or areas["max_hole_area"] > 0:
      mask = inference.remove_small_regions(mask, **areas)
    labels = glands.label(mask, split_h=split_h_input(settings["split_h"], rescale))
    rows = glands.measure(labels, px.mpp)
    gland_px = int(np.count_nonzero(mask))
    factor = images.downsample_factor(h, w, int(cfg.overlay_max_side))
    overlay, acc = overlay_and_stain(src, mask, factor,  # cuts exist only when glands were split
                                     labels=labels if settings["split_h"] > 0 else None)
    check = stain.compare(*acc.result(), loaded.card.get("stain_reference"),
                          float(cfg.stain_z_max)) if cfg.stain_check else \
        {"checked": False, "flagged": False, "message": "colour check off (predict.stain_check)"}
    if check["flagged"]:
      logging.warning("predict %s: %s", name, check["message"])
  large = h * w > int(cfg.tiff_mask_pixels)
  outputs = {
      "mask": str(_write_mask(out_dir / "masks" / f"{name}.png", out_dir / "masks" / f"{name}.tif",
                              mask, large, px.mpp)),
  }
  record_head = {"name": name, "input": str(path), "width": w, "height": h,
                 "pixel_size_um": px.mpp, "pixel_size_source": px.source,
                 "model_pixel_size_um": model_mpp, "rescale": rescale,
                 "rescaled": rescale != 1.0, "num_glands": len(rows),
                 "gland_area_px": gland_px, "gland_area_fraction": gland_px / float(h * w),
                 "gland_area_um2": None if px.mpp is None else gland_px * px.mpp ** 2,
                 "stain": check, "tissue": tissue_rec}
  fc = glands.feature_collection(labels, rows, simplify_px=float(cfg.simplify_px), properties={
      "image": name, "width": w, "height": h, "pixel_size_um": px.mpp,
      "model": loaded.card["provenance"]["params_digest"],
      "data_label": loaded.card["provenance"].get("data_label"),
      "note": check["message"] if check["flagged"] else ""})
  del labels
  geo = out_dir / "annotations" / f"{name}.geojson"
  io_utils.atomic_write_bytes(geo, json.dumps(fc, separators=(",", ":")).encode())
  outputs["geojson"] = str(geo)
  del fc
  csv_path = out_dir / "glands" / f"{name}.csv"
  io_utils.atomic_write_bytes(csv_path, glands.csv_text(rows).encode())
  outputs["csv"] = str(csv_path)
  ov = out_dir / "overlays" / f"{name}.png"
  io_utils.atomic_write_png(ov, overlay)
  outputs["overlay"] = str(ov)
  return {**record_head, "overlay_factor": factor, "num_regions": num_regions,
          "outputs": outputs, "notes": notes, "seconds": round(time.time() - start, 3)}


# The jitted network of the last model used, so that repeated runs in one process (a notebook, the
# tests) compile once; keyed by the weights' digests and the network config.
_APPLY_CACHE: dict[str, Any] = {}


def _apply_fn(loaded):
  from oeem_jax.engine.checkpoint import params_digest
  from oeem_jax.models import segmenter_apply_fn

  key = json.dumps([params_digest(loaded.variables["params"]),
                    params_digest(loaded.variables.get("batch_stats", {})),
                    loaded.card["network"]], sort_keys=True)
  if key not in _APPLY_CACHE:
    _APPLY_CACHE.clear()
    _APPLY_CACHE[key] = segmenter_apply_fn(loaded.model, loaded.variables)
  return _APPLY_CACHE[key]


def _done_record(path: Path, identity: str) -> dict[str, Any] | None:
  """The record of a previous run of the same image with the same settings, if complete."""
  if not path.is_file():
    return None
  try:
    rec = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None
  if rec.get("identity") != identity:
    return None
  if not all(Path(p).is_file() for p in rec.get("outputs", {}).values()):
    return None
  return rec


def _summary_lines(records: list[dict], failed: list[dict], num_files: int, skipped: int,
                   prov: dict, stage_dir: Path) -> list[str]:
  """The table printed at the end: one row per image (20 at most), the failures, the totals."""
  lines = [f"{'image':24s} {'W x H':>13s} {'glands':>7s} {'area %':>7s}  note"]
  for r in records[:20]:
    note = "; ".join(x for x in (r["stain"]["message"] if r["stain"]["flagged"] else "",
                                 "no rescaling" if not r["rescaled"] else f"rescaled x{r['rescale']:.3g}",
                                 "skipped (done)" if r.get("skipped") else "") if x)
    lines.append(f"{r['name'][:24]:24s} {str(r['width']) + 'x' + str(r['height']):>13s} "
                 f"{r['num_glands']:7d} {100 * r['gland_area_fraction']:7.2f}  {note}")
  if len(records) > 20:
    lines.append(f"... and {len(records) - 20} more (summary.json)")
  for f in failed:
    lines.append(f"FAILED {f['name']}: {f['error']}")
  if prov.get("synthetic"):
    lines.insert(0, f"MODEL TRAINED ON {prov.get('data_label')}")
  lines.append(f"predict: {len(records)} of {num_files} image(s) done ({skipped} skipped as done "
               f"before), {len(failed)} failed; outputs in {stage_dir}")
  return lines


def run(config: ml_collections.ConfigDict, stage_dir: Path) -> dict[str, Any]:
  """Runs the predict stage (module docstring); returns the summary fields.

  Raises:
    InputError: a bad config value, a missing or incompatible model, or inputs that name no image
      (per-image problems are reported in the summary instead, with `exit_status` 2).
  """
  from oeem_jax.predict.model_folder import load_model

  cfg = config.predict
  files = images.list_inputs(cfg.inputs)
  names = images.output_names(files)
  loaded = load_model(cfg.model, str(cfg.checkpoint))
  settings = inference_settings(cfg, loaded.card)
  prov = loaded.card["provenance"]
  logging.info("predict: model %s (step %s, %s, params %s...), %d input(s); settings %s",
               loaded.source, prov.get("step"), prov.get("data_label"),
               prov.get("params_digest", "")[:12], len(files), settings)
  if prov.get("synthetic"):
    logging.warning("predict: this segmenter was trained on %s", prov.get("data_label"))
  apply_fn = _apply_fn(loaded)
  records, failed = [], []
  skipped = 0
  start = time.time()
  for k, (path, name) in enumerate(zip(files, names)):
    rec_path = stage_dir / "records" / f"{name}.json"
    try:
      identity = _identity(path, name, loaded, settings, cfg)
    except OSError:  # vanished since it was listed: predict_file reports it
      identity = None
    prev = _done_record(rec_path, identity) if (identity and cfg.skip_done) else None
    if prev is not None:
      logging.info("predict [%d/%d] %s: done in an earlier run with the same settings, skipped",
                   k + 1, len(files), name)
      records.append({**prev, "skipped": True})
      skipped += 1
      continue
    logging.info("predict [%d/%d] %s (%s)", k + 1, len(files), name, path)
    try:
      rec = predict_file(loaded, apply_fn, path, name, settings, cfg, stage_dir)
    except InputError as e:
      logging.error("predict [%d/%d] %s: %s (skipped)", k + 1, len(files), name, e)
      failed.append({"name": name, "input": str(path), "error": str(e)})
      continue
    rec["identity"] = identity
    io_utils.atomic_write_json(rec_path, rec)
    records.append(rec)
    elapsed = time.time() - start
    todo = len(files) - k - 1
    logging.info("predict [%d/%d] %s: %d glands, %.1f %% gland area, %.1f s%s; ETA for the "
                 "remaining %d image(s) %s", k + 1, len(files), name, rec["num_glands"],
                 100 * rec["gland_area_fraction"], rec["seconds"],
                 " (COLOUR WARNING)" if rec["stain"]["flagged"] else "", todo,
                 regions.format_eta(elapsed / (k + 1 - skipped) * todo) if k + 1 > skipped else "?")
  lines = _summary_lines(records, failed, len(files), skipped, prov, stage_dir)
  return {
      "model": {"source": loaded.source, "provenance": prov,
                "pixel_size_um": loaded.card.get("pixel_size_um")},
      "settings": settings,
      "num_images": len(files), "num_done": len(records) - skipped, "num_skipped": skipped,
      "num_failed": len(failed), "num_flagged": sum(bool(r["stain"]["flagged"]) for r in records),
      "num_rescaled": sum(bool(r["rescaled"]) for r in records),
      "images": [{k: r[k] for k in ("name", "input", "width", "height", "num_glands",
                                    "gland_area_fraction", "gland_area_um2", "pixel_size_um",
                                    "pixel_size_source", "rescale", "rescaled", "stain", "tissue", "outputs",
                                    "notes") if k in r} for r in records],
      "failed": failed,
      "exit_status": FAILED_EXIT_STATUS if failed else 0,
      "final_line": "\n".join(lines),
  }
