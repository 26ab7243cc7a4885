"""Tests for oeem_jax.predict.images: TIFF region reads (tiled, stripped, BigTIFF, pyramid, planar), pixel
size from TIFF metadata, colour-mode conversions, refused inputs and input listing."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from oeem_jax import errors
from oeem_jax.errors import GlasDataError
from oeem_jax.predict import images

H, W = 150, 230


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


WINDOWS = [(0, H, 0, W), (17, 133, 40, 229), (H - 1, H, 0, 1), (5, 70, 200, W)]


@pytest.mark.parametrize("kind", ["tiled", "strips", "bigtiff_deflate", "pyramid", "planar"])
def test_tiff_regions_equal_the_array(tmp_path, rgb, kind):
  path = tmp_path / f"{kind}.tif"
  if kind == "tiled":
    tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb")
  elif kind == "strips":
    tifffile.imwrite(path, rgb, rowsperstrip=16, photometric="rgb")
  elif kind == "bigtiff_deflate":
    tifffile.imwrite(path, rgb, tile=(32, 48), compression="zlib", bigtiff=True, photometric="rgb")
  elif kind == "pyramid":
    with tifffile.TiffWriter(path) as w:
      w.write(rgb, tile=(64, 64), subifds=1, photometric="rgb")
      w.write(rgb[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb")
  else:
    tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
  with images.open_image(path) as src:
    assert (src.height, src.width) == (H, W)
    for y0, y1, x0, x1 in WINDOWS:
      out = src.read(y0, y1, x0, x1)
      assert out.dtype == np.uint8 and out.shape == (y1 - y0, x1 - x0, 3)
      np.testing.assert_array_equal(out, rgb[y0:y1, x0:x1])
    with pytest.raises(ValueError, match="outside the image"):
      src.read(0, H + 1, 0, 1)


@pytest.mark.parametrize("compression", ["jpeg", "lzw"])
def test_jpeg_and_lzw_tiffs_like_svs_slides_decode_region_by_region(tmp_path, compression):
  # Most .svs slides are tiled JPEG-in-TIFF (YCbCr); tifffile decodes them with imagecodecs, a
  # dependency. A smooth image so that JPEG's error is small; LZW is lossless.
  pytest.importorskip("imagecodecs", reason="imagecodecs is a dependency; reinstall oeem_jax")
  yy, xx = np.mgrid[0:H, 0:W]
  smooth = np.stack([100 + 80 * np.sin(yy / 17), 120 + 60 * np.cos(xx / 23),
                     150 + 0 * yy], -1).astype(np.uint8)
  path = tmp_path / f"{compression}.tif"
  tifffile.imwrite(path, smooth, tile=(64, 64), photometric="rgb", compression=compression)
  decoded = tifffile.imread(path)  # the whole file, decoded at once
  error = np.abs(decoded.astype(int) - smooth)
  if compression == "lzw":
    assert error.max() == 0
  else:
    assert 0 < error.mean() < 2.0  # lossy, and the file did hold JPEG data
  with images.open_image(path) as src:
    assert compression.upper() in src.description.upper()
    for y0, y1, x0, x1 in WINDOWS:  # region reads = the same pixels of the whole decode
      np.testing.assert_array_equal(src.read(y0, y1, x0, x1), decoded[y0:y1, x0:x1])


def test_tiled_tiff_reads_only_the_tiles_under_a_region(tmp_path, rgb):
  path = tmp_path / "t.tif"
  tifffile.imwrite(path, rgb, tile=(32, 32), photometric="rgb")
  with images.open_image(path) as src:
    src.read(40, 60, 40, 60)  # inside tile row 1, column 1
    assert sorted(src._cache) == [1 * 8 + 1]


@pytest.mark.parametrize("unit, res, mpp", [("CENTIMETER", 1e4 / 0.5, 0.5), ("INCH", 25400 / 0.25, 0.25),
                                            ("MICROMETER", 1 / 0.62, 0.62)])
def test_pixel_size_from_resolution_tags(tmp_path, rgb, unit, res, mpp):
  path = tmp_path / "r.tif"
  tifffile.imwrite(path, rgb, photometric="rgb", resolution=(res, res), resolutionunit=unit)
  with images.open_image(path) as src:
    assert src.pixel_size.source == "tiff_resolution"
    assert src.pixel_size.mpp == pytest.approx(mpp)


def test_pixel_size_defaults_are_ignored_and_svs_ome_are_read(tmp_path, rgb):
  path = tmp_path / "dpi72.tif"
  tifffile.imwrite(path, rgb, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
  with pytest.warns(UserWarning, match="352.8 µm/px"):
    src = images.open_image(path)
  assert src.pixel_size.mpp is None and "ignored" in src.pixel_size.note
  src.close()
  path = tmp_path / "plain.tif"
  tifffile.imwrite(path, rgb, photometric="rgb")
  with images.open_image(path) as src:
    assert src.pixel_size == images.PixelSize(None, "none", "")
  path = tmp_path / "a.svs.tif"
  tifffile.imwrite(path, rgb, photometric="rgb",
                   description="Aperio Image Library v12.0.5\r\n230x150 -> 230x150 - |AppMag = 40|MPP = 0.2520")
  with images.open_image(path) as src:
    assert (src.pixel_size.mpp, src.pixel_size.source) == (pytest.approx(0.252), "svs_description")
  path = tmp_path / "a.ome.tif"
  tifffile.imwrite(path, rgb, photometric="rgb", ome=True,
                   metadata={"axes": "YXS", "PhysicalSizeX": 0.44, "PhysicalSizeY": 0.44})
  with images.open_image(path) as src:
    assert (src.pixel_size.mpp, src.pixel_size.source) == (pytest.approx(0.44), "ome_xml")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA"])
def test_pil_modes_converted_with_a_warning(tmp_path, rgb, mode):
  img = Image.fromarray(rgb)
  img = img.convert("RGBA") if mode == "RGBA" else img.convert("L").convert(mode) if mode != "P" \
      else img.quantize(64)
  path = tmp_path / "x.png"
  img.save(path)
  with pytest.warns(UserWarning, match=f"mode {mode} converted to RGB"):
    src = images.open_image(path)
  expected = np.asarray(Image.open(path).convert("RGB"))
  np.testing.assert_array_equal(src.read(0, H, 0, W), expected)
  assert src.notes and "converted" in src.notes[0]


@pytest.mark.parametrize("kind", ["gray", "palette", "rgba"])
def test_tiff_modes_converted_with_a_warning(tmp_path, rgb, kind):
  path = tmp_path / f"{kind}.tif"
  if kind == "gray":
    tifffile.imwrite(path, rgb[..., 0], tile=(64, 64))
    expected = np.repeat(rgb[..., :1], 3, axis=-1)
  elif kind == "palette":
    cmap = np.zeros((3, 256), np.uint16)
    cmap[0] = np.arange(256) * 257
    cmap[2] = (255 - np.arange(256)) * 257
    tifffile.imwrite(path, rgb[..., 0], photometric="palette", colormap=cmap)
    expected = np.stack([rgb[..., 0], np.zeros_like(rgb[..., 0]), 255 - rgb[..., 0]], axis=-1)
  else:
    rgba = np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], axis=-1)
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"])
    expected = rgb
  with pytest.warns(UserWarning, match="converted to RGB"):
    src = images.open_image(path)
  np.testing.assert_array_equal(src.read(0, H, 0, W), expected)
  src.close()


def _refused(tmp_path, rgb):
  cases = {}
  p = tmp_path / "sixteen.png"
  Image.fromarray((rgb[..., 0].astype(np.uint16) * 200)).save(p)
  cases["sixteen.png"] = (p, "colour mode 'I;16'")
  p = tmp_path / "sixteen.tif"
  tifffile.imwrite(p, rgb.astype(np.uint16) * 200, photometric="rgb")
  cases["sixteen.tif"] = (p, "16-bit unsigned TIFF samples are not supported")
  p = tmp_path / "float.tif"
  tifffile.imwrite(p, rgb.astype(np.float32) / 255, photometric="rgb")
  cases["float.tif"] = (p, "32-bit float TIFF samples are not supported")
  p = tmp_path / "cmyk.jpg"
  Image.fromarray(rgb).convert("CMYK").save(p)
  cases["cmyk.jpg"] = (p, "colour mode 'CMYK'")
  good = tmp_path / "good.png"
  Image.fromarray(rgb).save(good)
  p = tmp_path / "truncated.png"
  p.write_bytes(good.read_bytes()[:2000])
  cases["truncated.png"] = (p, "unreadable or truncated")
  good_tif = tmp_path / "good.tif"
  tifffile.imwrite(good_tif, rgb, tile=(64, 64), compression="zlib", photometric="rgb")
  p = tmp_path / "truncated.tif"
  p.write_bytes(good_tif.read_bytes()[:len(good_tif.read_bytes()) // 2])
  cases["truncated.tif"] = (p, "truncated TIFF")
  p = tmp_path / "notanimage.png"
  p.write_text("hello")
  cases["notanimage.png"] = (p, "unreadable or truncated")
  p = tmp_path / "stack.tif"
  tifffile.imwrite(p, np.stack([rgb, rgb]), photometric="rgb")
  cases["stack.tif"] = (p, "a TIFF stack of 2 pages")
  cases["missing.png"] = (tmp_path / "missing.png", "image file not found")
  return cases


def test_bad_inputs_are_refused_with_a_named_error(tmp_path, rgb):
  for name, (path, message) in _refused(tmp_path, rgb).items():
    with pytest.raises(errors.InputError, match=message) as info:
      images.open_image(path)
    assert str(path) in str(info.value), name
    assert isinstance(info.value, GlasDataError)  # main.py: one error line, exit status 2


def test_list_inputs_file_folder_glob_and_errors(tmp_path, rgb):
  for name in ("b.png", "a.TIF", "c.jpeg", "notes.txt"):
    (tmp_path / name).write_bytes(b"x")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "d.bmp").write_bytes(b"x")
  assert [p.name for p in images.list_inputs(str(tmp_path))] == ["a.TIF", "b.png", "c.jpeg"]
  assert [p.name for p in images.list_inputs(str(tmp_path / "*.png"))] == ["b.png"]
  assert [p.name for p in images.list_inputs(str(tmp_path / "**" / "*.bmp"))] == ["d.bmp"]
  assert images.list_inputs(str(tmp_path / "notes.txt")) == [tmp_path / "notes.txt"]
  (tmp_path / "empty").mkdir()
  for spec, message in [("", "predict.inputs is empty"), (str(tmp_path / "empty"), "holds no image"),
                        (str(tmp_path / "*.gif"), "matches no image"),
                        (str(tmp_path / "nope"), "does not exist")]:
    with pytest.raises(errors.InputError, match=message):
      images.list_inputs(spec)


def test_output_names_disambiguate(tmp_path):
  from pathlib import Path
  files = [Path("x/a.png"), Path("x/a.tif"), Path("x/b.png"), Path("y/b.png")]
  assert images.output_names(files) == ["a_png", "a_tif", "x_b_png", "y_b_png"]
  with pytest.raises(errors.InputError, match="same outputs"):
    images.output_names([Path("x/a.png"), Path("x/a.png")])


def test_downsample_factor():
  assert images.downsample_factor(522, 775, 2048) == 1
  assert images.downsample_factor(10_000, 10_000, 2048) == 5
  assert images.downsample_factor(10_000, 3, 2048) == 5
