"""Tests for stages export and predict (oeem_jax.predict.regions, oeem_jax.predict.stain, oeem_jax.predict.model_folder).

A tiny PSPNet (ResNet38 at width 1/16, window 48) with random weights stands in for a trained
segmenter wherever only the plumbing is tested: region tiling against whole-image inference (one
compile), pixel-size rescaling, the outputs and their formats, bad inputs, skip-and-continue, reruns.
Export -> predict is compared with stage eval on the synthetic test images.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tifffile
from PIL import Image
from skimage.draw import polygon as fill_polygon
from skimage.morphology import dilation
from skimage.segmentation import find_boundaries

from oeem_jax import errors, stages
from oeem_jax.config import base as config_base
from oeem_jax.config.base import load_config_file
from oeem_jax.data import synthetic
from oeem_jax.engine.checkpoint import params_digest
from oeem_jax.errors import ConfigError
from oeem_jax.evaluation import inference, metrics
from oeem_jax.models.network import normalizer
from oeem_jax.predict import images, model_folder, regions, stain
from oeem_jax.stages import predict as predict_stage

WINDOW, STRIDE, BATCH = model_folder.TINY_WINDOW, model_folder.TINY_STRIDE, model_folder.TINY_BATCH
NETWORK = model_folder.TINY_NETWORK
NORMALIZE = normalizer("seg", None)


def draw(h: int, w: int, seed: int = 0) -> np.ndarray:
  return synthetic.draw_example(np.random.default_rng(seed), bool(seed % 2), h, w)[0]


random_variables = model_folder.random_variables


def tiny_card(variables, *, pixel_size_um=0.62, reference=None) -> dict:
  return model_folder.random_model_card(variables, pixel_size_um=pixel_size_um, reference=reference)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(model, variables, counting jitted apply_fn, traces list, model folder)."""
  model = model_folder.build_network({"network": NETWORK})
  variables = random_variables(model)
  traces = []

  @jax.jit
  def fwd(x):
    traces.append(x.shape)  # runs once per compile
    return model.apply(variables, x, train=False)[0]

  reference = stain.reference([draw(96, 128, s) for s in range(6)])
  folder = model_folder.write_model_folder(tmp_path_factory.mktemp("m") / "model",
                                           tiny_card(variables, reference=reference), variables)
  return model, variables, (lambda x: np.asarray(fwd(jnp.asarray(x)))), traces, folder


def conv_apply(x):
  """A smooth per-window 'segmenter' (9x9 mean of the darkness -> 2 logits): translation
  equivariant up to the window border, so rescaling can be compared with a clear answer."""
  dark = -jnp.mean(x, axis=-1, keepdims=True)
  k = jnp.ones((9, 9, 1, 1), jnp.float32) / 81
  s = jax.lax.conv_general_dilated(dark, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.concatenate([-s, s + 2.99], axis=-1) * 8  # a 9 x 9 mean above -1.49: about half


CONV = jax.jit(conv_apply)


def conv_fn(x):
  return np.asarray(CONV(jnp.asarray(x)))


# ---------------------------------------------------------------------------------------------------
# Region tiling


def test_axis_plan_covers_and_aligns():
  for length in (1, 47, 190, 250, 1001):
    plan = regions.axis_plan(length, 64, 50, 32)
    assert plan[0][0] == 0 and plan[-1][1] == length
    for (a, b, s, e), nxt in zip(plan, plan[1:] + [None]):
      assert 0 <= s <= a < b <= e <= length
      assert s % 32 == 0 and (length - e) % 32 == 0
      assert s == 0 or a - s >= 50
      assert e == length or e - b >= 50
      if nxt:
        assert nxt[0] == b
  assert regions.axis_plan(100, 2048, 300, 32) == [(0, 100, 0, 100)]  # one region = whole image
  with pytest.raises(ValueError):
    regions.axis_plan(0, 64, 10, 1)


def test_regions_equal_whole_image_and_compile_once(tiny):
  _, _, apply_fn, traces, _ = tiny
  h, w = 190, 250  # not multiples of the region (64), the window (48) or the stride (32)
  img = draw(h, w, 3)
  kw = dict(normalize=NORMALIZE, flip=True, window=WINDOW, stride=STRIDE, batch_size=BATCH)
  whole = np.argmax(inference.predict_probs(apply_fn, img, scales=(1.0,), **kw), axis=-1)
  assert 0.05 < whole.mean() < 0.95  # the random network gives a non-trivial mask
  plan = regions.plan_regions(h, w, region_size=64, align=STRIDE,
                              margin=regions.region_margin(WINDOW, (1.0,)))
  assert len(plan) == 3 * 4
  parts = regions.predict_mask(apply_fn, lambda y0, y1, x0, x1: img[y0:y1, x0:x1], h, w,
                               scales=(1.0,), region_size=64, **kw)
  assert parts.dtype == np.uint8
  np.testing.assert_array_equal(parts, whole)  # bit for bit at scale 1, flips included
  assert traces == [(BATCH, WINDOW, WINDOW, 3)]  # one compile for every region and pass


def test_regions_at_other_scales_match_whole_image():
  # With read windows aligned for every scale (oeem_jax.predict.regions.region_align) the window grids
  # match; only scaled_size's rounding could move pixels at the sub-pixel level (none do here).
  h, w = 190, 250
  img = draw(h, w, 3)
  kw = dict(normalize=NORMALIZE, flip=True, window=WINDOW, stride=STRIDE, batch_size=BATCH,
            scales=(0.75, 1.0, 1.25))
  whole = np.argmax(inference.predict_probs(conv_fn, img, **kw), axis=-1)
  assert 0.05 < whole.mean() < 0.95
  assert regions.region_align(STRIDE, kw["scales"]) == 4 * STRIDE  # 0.75 x 128 = 3 strides
  parts = regions.predict_mask(conv_fn, lambda y0, y1, x0, x1: img[y0:y1, x0:x1], h, w,
                               region_size=64, **kw)
  np.testing.assert_array_equal(parts, whole)
  # Aligned to the stride only, the grids of scales 0.75 and 1.25 shift: window-border effects
  # then move pixels (this is what the alignment is for).
  loose = regions.predict_mask(conv_fn, lambda y0, y1, x0, x1: img[y0:y1, x0:x1], h, w,
                               region_size=64, align=False, **kw)
  assert 0 < np.mean(loose != whole) < 0.1


def test_pixel_size_rescaling_matches_the_1x_input():
  img1 = draw(96, 128, 5)
  img2 = np.repeat(np.repeat(img1, 2, axis=0), 2, axis=1)  # the same tissue at twice the resolution
  kw = dict(normalize=NORMALIZE, scales=(1.0,), flip=False, window=WINDOW, stride=STRIDE,
            batch_size=BATCH)
  m1 = regions.predict_mask(conv_fn, lambda y0, y1, x0, x1: img1[y0:y1, x0:x1], 96, 128, **kw)
  assert 0.05 < m1.mean() < 0.95
  # input_mpp = half the model's: predicted at half size (regions included), mask at the input size.
  m2 = regions.predict_mask(conv_fn, lambda y0, y1, x0, x1: img2[y0:y1, x0:x1], 192, 256,
                            rescale=0.5, region_size=100, **kw)
  up = np.repeat(np.repeat(m1, 2, axis=0), 2, axis=1)
  diff = m2 != up
  # Tolerance: the 2x mask comes from bilinearly upsampled probabilities, so pixels next to a
  # gland border can fall either way; nowhere else may they differ.
  near_border = dilation(find_boundaries(up, mode="thick"), np.ones((3, 3), bool))
  assert not (diff & ~near_border).any()
  assert diff.mean() < 0.02


# ---------------------------------------------------------------------------------------------------
# Stain check


def test_stain_check_flags_ihc_not_he():
  from skimage import data as skdata

  ref = stain.reference([draw(96, 128, s) for s in range(6)])
  he = stain.compare(*stain.features(draw(120, 160, 11)), ref, 6.0)
  assert he["checked"] and not he["flagged"] and he["max_abs_z"] < 6.0
  ihc = stain.compare(*stain.features(skdata.immunohistochemistry()), ref, 6.0)
  assert ihc["flagged"] and ihc["message"].startswith(stain.WARNING) and "dab" in ihc["message"]
  assert ihc["z"][2] > 6.0  # DAB, what IHC adds
  white = stain.compare(*stain.features(np.full((50, 50, 3), 250, np.uint8)), ref, 6.0)
  assert white["flagged"] and "almost no tissue" in white["message"]
  assert stain.compare(np.zeros(3), 0.5, None, 6.0)["checked"] is False


def test_stain_feature_region_by_region_equals_whole():
  img = draw(101, 133, 2)
  acc = stain.Accumulator()
  for y0, y1, x0, x1 in [(0, 37, 0, 133), (37, 101, 0, 59), (37, 101, 59, 133)]:
    acc.add(img[y0:y1, x0:x1], y0, x0)
  f, frac = acc.result()
  g, gfrac = stain.features(img)
  np.testing.assert_allclose(f, g, rtol=1e-12)
  assert frac == gfrac


# ---------------------------------------------------------------------------------------------------
# The stage


def predict_config(model, inputs, **kw) -> ml_collections.ConfigDict:
  c = load_config_file("predict").get_config()
  c.predict.model = str(model)
  c.predict.inputs = str(inputs)
  for k, v in kw.items():
    c.predict[k] = v
  return c


def rasterise(fc: dict, shape) -> np.ndarray:
  out = np.zeros(shape, bool)
  for feat in fc["features"]:
    g = feat["geometry"]
    for poly in ([g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]):
      part = np.zeros(shape, bool)
      for k, ring in enumerate(poly):
        r = np.asarray(ring)
        rr, cc = fill_polygon(r[:, 1] - 0.5, r[:, 0] - 0.5, shape)
        part[rr, cc] = k == 0
      out |= part
  return out


def test_predict_folder_outputs_bad_files_and_rerun(tiny, tmp_path):
  *_, folder = tiny
  inp = tmp_path / "in"
  inp.mkdir()
  good = draw(130, 170, 7)
  Image.fromarray(good).save(inp / "good.png")
  big = draw(300, 420, 8)  # 0.31 µm/px in its tags: twice the model's 0.62 -> predicted at half size
  tifffile.imwrite(inp / "big.tif", big, tile=(64, 64), compression="zlib", photometric="rgb",
                   resolution=(1e4 / 0.31, 1e4 / 0.31), resolutionunit="CENTIMETER")
  (inp / "truncated.png").write_bytes((inp / "good.png").read_bytes()[:3000])
  Image.fromarray(good[..., 0].astype(np.uint16) * 200).save(inp / "sixteen.png")
  (inp / "notes.txt").write_text("not an image")
  out = tmp_path / "out"
  c = predict_config(folder, inp, region_size=128, tiff_mask_pixels=50_000, overlay_max_side=100)
  s = stages.run_stage(c, out)

  assert s["exit_status"] == 2 and s["num_images"] == 4 and s["num_done"] == 2
  failed = {f["name"]: f["error"] for f in s["failed"]}
  assert set(failed) == {"truncated", "sixteen"}
  assert str(inp / "truncated.png") in failed["truncated"] and "truncated" in failed["truncated"]
  assert "colour mode 'I;16'" in failed["sixteen"]
  pd = out / "predict"
  assert not list(pd.rglob("*truncated*")) and not list(pd.rglob("*sixteen*"))
  assert not list(pd.rglob(".*.tmp")) and not list(pd.rglob(".*tmp*"))
  assert json.loads((pd / "summary.json").read_text())["num_failed"] == 2

  recs = {r["name"]: r for r in s["images"]}
  g, b = recs["good"], recs["big"]
  assert (g["rescale"], g["rescaled"], g["pixel_size_source"]) == (1.0, False, "none")
  assert any("no rescaling" in n for n in g["notes"])
  assert (b["rescale"], b["pixel_size_source"]) == (pytest.approx(0.5), "tiff_resolution")
  # Small image: PNG mask 0/255; large: tiled TIFF with the resolution tags, same 0/255 values.
  mask_g = np.asarray(Image.open(pd / "masks" / "good.png"))
  assert mask_g.shape == (130, 170) and set(np.unique(mask_g)) <= {0, 255}
  assert g["outputs"]["mask"].endswith("good.png") and b["outputs"]["mask"].endswith("big.tif")
  with tifffile.TiffFile(pd / "masks" / "big.tif") as t:
    page = t.pages[0]
    mask_b = page.asarray()
    assert page.is_tiled and page.resolution == pytest.approx((1e4 / 0.31, 1e4 / 0.31))
  assert mask_b.shape == (300, 420) and set(np.unique(mask_b)) <= {0, 255}
  # Overlays: factor ceil(170 / 100) = 2 and ceil(420 / 100) = 5.
  assert np.asarray(Image.open(pd / "overlays" / "good.png")).shape == (65, 85, 3)
  assert np.asarray(Image.open(pd / "overlays" / "big.png")).shape == (60, 84, 3)
  # GeoJSON (read back from the file) rasterises to the mask; the CSV has one row per feature.
  for name, mask in (("good", mask_g), ("big", mask_b)):
    fc = json.loads((pd / "annotations" / f"{name}.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == recs[name]["num_glands"]
    np.testing.assert_array_equal(rasterise(fc, mask.shape), mask > 0)
    rows = (pd / "glands" / f"{name}.csv").read_text().strip().split("\n")
    assert len(rows) == 1 + recs[name]["num_glands"]
    assert recs[name]["gland_area_fraction"] == pytest.approx((mask > 0).mean())
  assert recs["big"]["num_glands"] > 0
  big_rows = (pd / "glands" / "big.csv").read_text().strip().split("\n")
  first = dict(zip(big_rows[0].split(","), big_rows[1].split(",")))
  assert float(first["area_um2"]) == pytest.approx(int(first["area_px"]) * 0.31 ** 2, rel=1e-5)

  # Rerun: the finished images are skipped (records untouched), the bad ones reported again.
  mtimes = {p: p.stat().st_mtime_ns for p in (pd / "records").iterdir()}
  again = stages.run_stage(c, out)
  assert again["num_skipped"] == 2 and again["num_done"] == 0 and again["exit_status"] == 2
  assert mtimes == {p: p.stat().st_mtime_ns for p in (pd / "records").iterdir()}
  # Another setting is another result: predicted again.
  c.predict.flip = False
  third = stages.run_stage(c, out)
  assert third["num_skipped"] == 0 and third["num_done"] == 2 and third["settings"]["flip"] is False


def test_tissue_detection_on_a_slide_of_glass(tiny, tmp_path):
  """A field on glass: the field is predicted as without detection, the far glass is skipped and
  non-gland; a slide of glass only gives an empty mask and a note."""
  *_, folder = tiny
  rng = np.random.default_rng(5)
  glass = np.clip(np.full((600, 800, 3), (238, 238, 242)) + rng.integers(-3, 4, (600, 800, 3)),
                  0, 255).astype(np.uint8)
  slide = glass.copy()
  slide[200:500, 250:650] = draw(300, 400, 7)  # 186 x 248 µm: above the 0.01 mm² speck limit
  mpp = dict(resolution=(1e4 / 0.62, 1e4 / 0.62), resolutionunit="CENTIMETER")
  tifffile.imwrite(tmp_path / "slide.tif", slide, tile=(64, 64), photometric="rgb", **mpp)
  tifffile.imwrite(tmp_path / "glass.tif", glass, tile=(64, 64), photometric="rgb", **mpp)
  kw = dict(region_size=128, tiff_mask_pixels=0, overlay_max_side=200)
  on = stages.run_stage(predict_config(folder, tmp_path / "slide.tif", **kw), tmp_path / "on")
  off = stages.run_stage(predict_config(folder, tmp_path / "slide.tif", tissue_detection="off",
                                        **kw), tmp_path / "off")
  m_on, m_off = (tifffile.imread(d / "predict" / "masks" / "slide.tif") for d in
                 (tmp_path / "on", tmp_path / "off"))
  rec = on["images"][0]["tissue"]
  assert rec["used"] and off["images"][0]["tissue"]["used"] is False
  # The thumbnail (1/13) finds the field, 300 x 400 px of 600 x 800 (25 %).
  assert 0.22 < rec["fraction"] < 0.3 and rec["thumbnail_size"] == [62, 47]
  np.testing.assert_array_equal(m_on[200:500, 250:650], m_off[200:500, 250:650])
  assert 0 < rec["windows_skipped"] < rec["windows"] and rec["regions_skipped"] > 0
  # More than the margin (50 px) plus a window (48) plus a thumbnail pixel (13) from the field:
  # no window ran there, non-gland.
  assert not m_on[:, 765:].any() and not m_on[:85].any()
  empty = stages.run_stage(predict_config(folder, tmp_path / "glass.tif", **kw), tmp_path / "g")
  g = empty["images"][0]
  assert g["tissue"]["fraction"] == 0.0 and g["num_glands"] == 0
  assert any("no tissue found" in n for n in g["notes"])
  assert not tifffile.imread(tmp_path / "g" / "predict" / "masks" / "glass.tif").any()


def test_region_size_does_not_change_the_mask_at_scale_one(tiny, tmp_path):
  *_, folder = tiny
  img = draw(180, 260, 9)
  Image.fromarray(img).save(tmp_path / "x.png")
  a = stages.run_stage(predict_config(folder, tmp_path / "x.png", region_size=2048), tmp_path / "a")
  b = stages.run_stage(predict_config(folder, tmp_path / "x.png", region_size=70), tmp_path / "b")
  assert a["exit_status"] == b["exit_status"] == 0
  ma = np.asarray(Image.open(tmp_path / "a" / "predict" / "masks" / "x.png"))
  mb = np.asarray(Image.open(tmp_path / "b" / "predict" / "masks" / "x.png"))
  assert json.loads((tmp_path / "b" / "predict" / "records" / "x.json").read_text())["num_regions"] == 12
  np.testing.assert_array_equal(ma, mb)


def test_ihc_image_is_flagged_in_the_summary(tiny, tmp_path):
  from skimage import data as skdata

  *_, folder = tiny
  Image.fromarray(skdata.immunohistochemistry()[::4, ::4]).save(tmp_path / "ihc.png")
  Image.fromarray(draw(96, 128, 12)).save(tmp_path / "he.png")
  s = stages.run_stage(predict_config(folder, tmp_path), tmp_path / "o")
  flags = {r["name"]: r["stain"]["flagged"] for r in s["images"]}
  assert flags == {"ihc": True, "he": False} and s["num_flagged"] == 1
  assert stain.WARNING in s["final_line"]
  fc = json.loads((tmp_path / "o" / "predict" / "annotations" / "ihc.geojson").read_text())
  assert stain.WARNING in fc["properties"]["note"]


def test_bad_models_and_inputs_are_named(tiny, tmp_path):
  *_, folder = tiny
  Image.fromarray(draw(64, 64)).save(tmp_path / "x.png")
  cases = []
  cases.append((tmp_path / "nope", "does not exist"))
  (tmp_path / "empty").mkdir()
  cases.append((tmp_path / "empty", "neither a model folder"))
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  (no_weights / "model.json").write_text((folder / "model.json").read_text())
  cases.append((no_weights, "model folder without weights"))
  wrong = tmp_path / "wrong"
  model_folder.write_model_folder(wrong, json.loads((folder / "model.json").read_text()),
                                  random_variables(model_folder.build_network({"network": NETWORK})))
  card = json.loads((wrong / "model.json").read_text())
  card["network"]["model"]["width"] = 0.125
  (wrong / "model.json").write_text(json.dumps(card))
  cases.append((wrong, "network config does not match the weights"))
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "model.json").write_text("{not json")
  cases.append((corrupt, "unreadable model card"))
  unfinished = tmp_path / "unfinished"
  (unfinished / "seg" / "checkpoints").mkdir(parents=True)
  cases.append((unfinished, "seg stage there is not finished"))
  for model, message in cases:
    with pytest.raises(errors.InputError, match=message):
      stages.run_stage(predict_config(model, tmp_path / "x.png"), tmp_path / "o")
  assert not list((tmp_path / "o").rglob("*.*"))  # nothing written for a fatal error
  with pytest.raises(errors.InputError, match="holds no image"):
    stages.run_stage(predict_config(folder, tmp_path / "empty"), tmp_path / "o")
  # Values wrong whatever the model: config_check, before anything is read; a stride larger than
  # the model's window: only known once the model card is read.
  for key, value, error in [("stride", 100, errors.InputError), ("scales", (), ConfigError),
                            ("region_size", 4, ConfigError), ("input_mpp", -1.0, ConfigError),
                            ("min_object_area", -5, ConfigError), ("split_h", -1, ConfigError),
                            ("inputs", "", errors.InputError)]:
    c = predict_config(folder, tmp_path / "x.png")
    c.predict[key] = value
    with pytest.raises(error, match=f"config key predict.{key}"):
      stages.run_stage(c, tmp_path / "o")
  assert not list((tmp_path / "o").rglob("*.*"))


def _fake_seg_stage(workdir: Path, data_cache: Path, variables: dict) -> ml_collections.ConfigDict:
  """WORKDIR/seg as train_loop leaves it (best/<step>/variables + summary.json), without training."""
  c = config_base.get_base_config("seg")
  config_base.add_model_config(c, width=NETWORK["model"]["width"])
  config_base.add_seg_config(c)
  c.seg.eval_window, c.seg.eval_stride = WINDOW, STRIDE
  c.data.cache_dir = str(data_cache)
  seg = workdir / "seg"
  with ocp.CheckpointManager((seg / "best").absolute(),
                             options=ocp.CheckpointManagerOptions(create=True)) as m:
    m.save(1, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables)))
    m.wait_until_finished()
  (seg / "summary.json").write_text(json.dumps({"stage": "seg", "config": c.to_dict(), "steps": 1,
                                                "synthetic_data": True}))
  return c


def test_export_then_predict_equals_eval(tiny, tmp_path, data_cache):
  model, variables, *_ = tiny
  workdir = tmp_path / "w"
  _fake_seg_stage(workdir, data_cache, variables)
  ev = load_config_file("eval").get_config("demo")
  ev.data.cache_dir = str(data_cache)
  ev.eval.checkpoint = "best"
  ev.eval.splits = "test_a"
  ev.eval.window, ev.eval.stride, ev.eval.batch_size = WINDOW, STRIDE, BATCH
  ev.eval.scales, ev.eval.flip = (1.0, 1.25), True
  ev.eval.min_object_area = ev.eval.max_hole_area = 30
  ev.eval.split_h = 1  # small enough to split some of the random network's small blobs
  ev.eval.overlays = False
  stages.run_stage(ev, workdir)
  m = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert m["split_h"] == 1
  # Eval scored the split instances of its saved masks (the masks are the post-processed ones).
  saved = [np.asarray(Image.open(f)) > 0 for f in sorted((workdir / "eval" / "predictions").glob("*.png"))]
  num_split = sum(int(metrics.split_instances(a, 1).max()) for a in saved)
  assert num_split > sum(int(metrics.label_instances(a).max()) for a in saved)  # splitting matters
  assert m["splits"]["test_a"]["object"]["num_pred_objects"] == num_split
  ex = load_config_file("export").get_config()
  s = stages.run_stage(ex, workdir)
  card = json.loads((workdir / "export" / "model" / "model.json").read_text())
  assert card["inference"]["scales"] == [1.0, 1.25] and card["inference"]["min_object_area"] == 30
  assert card["inference"]["split_h"] == 1  # travels with the model like the areas
  assert card["provenance"]["checkpoint"] == "best" and card["provenance"]["step"] == 1
  assert card["provenance"]["params_digest"] == params_digest(variables["params"])
  assert card["provenance"]["synthetic"] is True and "SYNTHETIC" in card["provenance"]["data_label"]
  assert card["pixel_size_um"] is None and card["stain_reference"]["num_images"] > 0
  assert s["model_dir"] == str(workdir / "export" / "model")
  # The seg stage's network card travels in model.json and is what predict rebuilds.
  constructor = card["network"]["constructor"]
  assert constructor["network"] == "PSPNet" and constructor["input"]["kind"] == "seg"
  rebuilt = model_folder.build_network(card)
  assert (rebuilt.width, rebuilt.b7_dilation, rebuilt.backbone_name) == (model.width, model.b7_dilation,
                                                                         model.backbone_name)

  folder = synthetic.ensure_synthetic_glas(data_cache, 12, 4)
  tests = sorted(p for p in folder.glob("testA_*.png") if "_anno" not in p.name)
  assert tests
  num_rows = 0
  for model_spec, out in ((workdir / "export" / "model", tmp_path / "p1"), (workdir, tmp_path / "p2")):
    p = stages.run_stage(predict_config(model_spec, folder / "testA_*[0-9].png"), out)
    assert p["exit_status"] == 0 and p["num_done"] == len(tests)
    for t in tests:
      mine = np.asarray(Image.open(out / "predict" / "masks" / f"{t.stem}.png"))
      theirs = np.asarray(Image.open(workdir / "eval" / "predictions" / f"{t.stem}.png"))
      np.testing.assert_array_equal(mine, theirs)
      # The per-gland CSV holds the split instances of the mask (split_h 1 from the model card).
      rows = (out / "predict" / "glands" / f"{t.stem}.csv").read_text().strip().splitlines()[1:]
      num_rows += len(rows)
      assert len(rows) == int(metrics.split_instances(mine > 0, 1).max())
    assert p["settings"]["split_h"] == 1
  assert num_rows == 2 * num_split


def test_split_h_setting_defaults_for_older_cards_and_scales_as_a_length(tiny):
  *_, folder = tiny
  card = json.loads((folder / "model.json").read_text())
  assert card["inference"]["split_h"] == 0
  del card["inference"]["split_h"]  # a model folder exported before the key existed
  cfg = predict_config(folder, "x.png").predict
  assert predict_stage.inference_settings(cfg, card)["split_h"] == 0
  card["inference"]["split_h"] = 6
  assert predict_stage.inference_settings(cfg, card)["split_h"] == 6
  cfg.split_h = 2  # the config key wins over the card
  assert predict_stage.inference_settings(cfg, card)["split_h"] == 2
  cfg.split_h = -4
  with pytest.raises(errors.InputError, match="predict.split_h"):
    predict_stage.inference_settings(cfg, card)
  # Model pixels -> input pixels: a length, divided by the rescale factor (areas by its square).
  assert predict_stage.split_h_input(0, 0.5) == 0
  assert predict_stage.split_h_input(22, 1.0) == 22
  assert predict_stage.split_h_input(22, 0.5) == 44   # input at twice the model's resolution
  assert predict_stage.split_h_input(22, 4.0) == 6    # 5.5 rounds to 6
  assert predict_stage.split_h_input(1, 8.0) == 1     # never turned off by a coarse input


def test_overlay_draws_the_cuts_between_split_glands():
  # Two discs of radius 12 whose centres are 20 px apart overlap in a neck: one 8-connected
  # component; split_h 4 cuts it at the neck (the column x = 30, midway between the centres).
  yy, xx = np.mgrid[:40, :64]
  mask = (((yy - 20) ** 2 + (xx - 20) ** 2 <= 144) | ((yy - 20) ** 2 + (xx - 40) ** 2 <= 144))
  mask = mask.astype(np.uint8)
  split = metrics.split_instances(mask, 4)
  assert split.max() == 2 and metrics.label_instances(mask).max() == 1
  cuts = predict_stage.split_cuts(split)
  assert cuts.any() and not predict_stage.split_cuts(metrics.label_instances(mask)).any()
  # Cut pixels are gland pixels beside the other gland, all within 2 px of the midline x = 30.
  assert mask[cuts].all() and np.all(np.abs(np.nonzero(cuts)[1] - 29.5) <= 2)
  src = images.ArraySource(Path("x.png"), np.full((40, 64, 3), 200, np.uint8),
                           images.PixelSize(None, "none"), [], "test")
  green = lambda im: np.all(im == predict_stage.OVERLAY_COLOUR, axis=-1)
  plain, _ = predict_stage.overlay_and_stain(src, mask, 1)
  drawn, _ = predict_stage.overlay_and_stain(src, mask, 1, labels=split)
  assert np.array_equal(green(drawn), green(plain) | cuts)
  # labels of the unsplit mask draw nothing extra (split_h 0 overlays are unchanged).
  same, _ = predict_stage.overlay_and_stain(src, mask, 1, labels=metrics.label_instances(mask))
  assert np.array_equal(same, plain)
  # Downsampled by 2: the cut is still drawn, within 1 px of the midline (x = 15 at half size).
  small_plain, _ = predict_stage.overlay_and_stain(src, mask, 2)
  small, _ = predict_stage.overlay_and_stain(src, mask, 2, labels=split)
  extra = green(small) & ~green(small_plain)
  assert extra.any() and np.all(np.abs(np.nonzero(extra)[1] - 14.5) <= 1.5)
