"""A user's own images for stage `predict`: listing, decoding, region reads and pixel size.

Formats: PNG, JPEG, BMP (Pillow, decoded whole: these formats have no random access) and TIFF
(tifffile: classic and BigTIFF, tiled or stripped; of a pyramidal TIFF the full-resolution level).
TIFF is read region by region, segment by segment (`TiffSource`), so a 10,000 x 10,000 tiled TIFF
never sits in memory whole; a TIFF whose one strip is larger than `WHOLE_READ_SEGMENT_BYTES`, or
whose samples are stored planar, is read whole (logged).

Colour modes (as the GlaS loader, `oeem_jax.data.source.decode_image`): 8-bit RGB is used as is;
8-bit gray, palette and RGBA (alpha dropped) are converted to RGB with a warning; anything else
(16-bit, float, CMYK, LAB, ...) is refused with an `InputError` naming the file and the mode.

Pixel size (`source_mpp`): TIFF resolution tags (XResolution / YResolution with ResolutionUnit inch,
cm, mm or µm), an Aperio SVS description (`MPP = ...`) or OME-XML `PhysicalSizeX`; values outside
`MPP_RANGE` (e.g. the 72 dpi default of image editors, 352.8 µm/px) are ignored with a note.

Every problem with an input raises `InputError` (a `GlasDataError`, so `oeem_jax.main` prints one
`error:` line and exits 2 when it is fatal); nothing is written by this module.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
from absl import logging

from oeem_jax.errors import InputError

# Suffixes picked up from a folder or a glob (case-insensitive).
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES
# Pixel sizes read from a file outside this range (µm/px) are treated as absent: no microscope image
# is coarser than 20 µm/px, and 72/96/300 dpi defaults land far above it.
MPP_RANGE = (0.05, 20.0)
# A TIFF segment (strip or tile) larger than this is not worth reading region by region.
WHOLE_READ_SEGMENT_BYTES = 64 * 2**20
# Pillow refuses images above 2 x Image.MAX_IMAGE_PIXELS (~179 MP) as "decompression bombs"; a
# histology image may be bigger. Up to this many pixels are allowed while `predict` opens a file.
MAX_PIL_PIXELS = 4 * 10**9

_CONVERT_MODES = ("L", "LA", "1", "P", "PA", "RGBA")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclasses.dataclass
class PixelSize:
  """Pixel size of an image.

  Attributes:
    mpp: µm per pixel (mean of x and y), or None when unknown.
    source: where it came from: "config", "tiff_resolution", "svs_description", "ome_xml" or "none".
    note: what was ignored or adjusted, for the log and summary ("" when nothing).
  """
  mpp: float | None
  source: str
  note: str = ""


class ImageSource:
  """An opened input image: size, pixel size, and uint8 RGB regions on demand.

  Attributes:
    path: the file.
    height, width: size in pixels (full resolution).
    pixel_size: `PixelSize` from the file's metadata (`source` "none" when absent).
    notes: conversions and other warnings raised while opening (also logged).
    description: format, compression and layout, for the log.
  """

  path: Path
  height: int
  width: int
  pixel_size: PixelSize
  notes: list[str]
  description: str

  def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Returns uint8[y1 - y0, x1 - x0, 3] RGB of rows y0..y1-1, columns x0..x1-1 (px).

    Raises:
      ValueError: the window is empty or outside the image.
      InputError: the file turned out unreadable while decoding.
    """
    raise NotImplementedError

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _check_window(self, y0: int, y1: int, x0: int, x1: int) -> None:
    if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
      raise ValueError(f"{self.path}: region rows {y0}:{y1}, cols {x0}:{x1} outside the image "
                       f"{self.height}x{self.width} (HxW)")


def _note(notes: list[str], msg: str) -> None:
  logging.warning("%s", msg)
  warnings.warn(msg, stacklevel=3)
  notes.append(msg)


class ArraySource(ImageSource):
  """An image held in memory as uint8[H, W, 3] (decoded PNG/JPEG/BMP, or a whole-read TIFF)."""

  def __init__(self, path: Path, image: np.ndarray, pixel_size: PixelSize, notes: list[str],
               description: str):
    self.path, self.image = Path(path), image
    self.height, self.width = image.shape[:2]
    self.pixel_size, self.notes, self.description = pixel_size, notes, description

  def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    self._check_window(y0, y1, x0, x1)
    return self.image[y0:y1, x0:x1]

  def close(self) -> None:
    self.image = None


def _open_pil(path: Path) -> ArraySource:
  from PIL import Image

  notes: list[str] = []
  old = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = MAX_PIL_PIXELS // 2
  try:
    img = Image.open(path)
    img.load()  # full decode: catches truncated / corrupt pixel data
  except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
    raise InputError(f"{path}: unreadable or truncated image file ({type(e).__name__}: {e}); "
                     "expected a complete 8-bit PNG, JPEG, BMP or TIFF") from e
  finally:
    Image.MAX_IMAGE_PIXELS = old
  fmt = img.format or path.suffix.lstrip(".").upper()
  if img.mode != "RGB":
    if img.mode not in _CONVERT_MODES:
      raise InputError(f"{path}: image colour mode {img.mode!r} is not supported; expected 8-bit RGB "
                       "(8-bit gray, palette and RGBA are converted; 16-bit, float, CMYK and others "
                       "are refused: convert the image to 8-bit RGB first)")
    _note(notes, f"{path}: image mode {img.mode} converted to RGB" +
          (" (alpha dropped)" if "A" in img.mode else ""))
    img = img.convert("RGB")
  image = np.asarray(img, dtype=np.uint8)
  img.close()
  return ArraySource(path, image, PixelSize(None, "none"), notes, f"{fmt} (decoded whole)")


# ----------------------------------------------------------------------------------------------
# TIFF
# ----------------------------------------------------------------------------------------------


def _tiff_mpp(tif, page) -> PixelSize:
  """Pixel size from OME-XML, an SVS description or the resolution tags of `page`, in that order
  of preference (see the module docstring); values outside `MPP_RANGE` are skipped with a note."""
  candidates: list[tuple[float, str]] = []
  if getattr(tif, "is_ome", False) and tif.ome_metadata:
    m = re.search(r"<Pixels\b[^>]*>", tif.ome_metadata)
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(0))) if m else {}
    factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(attrs.get("PhysicalSizeXUnit", "µm"))
    try:
      if "PhysicalSizeX" in attrs and factor:
        x = float(attrs["PhysicalSizeX"]) * factor
        y = float(attrs.get("PhysicalSizeY", attrs["PhysicalSizeX"])) * factor
        candidates.append(((x + y) / 2, "ome_xml"))
    except ValueError:
      pass
  if page.is_svs:  # Aperio: "Aperio Image Library ...|AppMag = 40|MPP = 0.2520|..."
    m = re.search(r"\|\s*MPP\s*=\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)", page.description or "")
    if m and float(m.group(1)) > 0:
      candidates.append((float(m.group(1)), "svs_description"))
  per_um = {2: 1 / 25400.0, 3: 1e-4, 4: 1e-3, 5: 1.0}.get(int(page.resolutionunit))  # RESUNIT
  notes = []
  if per_um is not None and 282 in page.tags and 283 in page.tags:
    xres, yres = page.resolution  # pixels per unit
    if xres > 0 and yres > 0:
      mx, my = 1.0 / (xres * per_um), 1.0 / (yres * per_um)
      if abs(mx - my) > 0.01 * max(mx, my):
        notes.append(f"x and y pixel sizes differ ({mx:.4g} vs {my:.4g} µm/px); using their mean")
      candidates.append(((mx + my) / 2, "tiff_resolution"))
  lo, hi = MPP_RANGE
  for mpp, source in candidates:
    if lo <= mpp <= hi:
      return PixelSize(float(mpp), source, "; ".join(notes))
    notes.append(f"{source} gives {mpp:.4g} µm/px, outside {lo}-{hi} µm/px: ignored (an image "
                 "editor's dpi default?)")
  return PixelSize(None, "none", "; ".join(notes))


class TiffSource(ImageSource):
  """A TIFF read region by region: only the tiles or strips under a region are decoded.

  Decoded segments of the previous read are kept (the next region usually shares its margin tiles
  or its strips), so memory stays at about two regions' worth of segments.
  """

  def __init__(self, path: Path):
    import tifffile

    self.path = Path(path)
    self.notes = []
    try:
      self._tif = tifffile.TiffFile(self.path)
      series = self._tif.series
      if not series:
        raise ValueError("no image series")
      level = series[0].levels[0]
      page = level.pages[0]
      if len(level.pages) != 1 or page is None:
        raise InputError(f"{self.path}: a TIFF stack of {len(level.pages)} pages (axes "
                         f"{level.axes}, shape {level.shape}); expected one 2-D RGB image (of a "
                         "pyramid, the full-resolution level is used)")
      page = page.keyframe if not hasattr(page, "dataoffsets") else page
    except InputError:
      self._close_file()
      raise
    except Exception as e:  # tifffile raises TiffFileError, ValueError, struct.error, ...
      self._close_file()
      raise InputError(f"{self.path}: unreadable TIFF ({type(e).__name__}: {e}); expected a "
                       "complete 8-bit RGB TIFF") from e
    self._page = page
    try:
      self._setup(page, len(series[0].levels))
    except BaseException:
      self._close_file()
      raise

  def _close_file(self) -> None:
    tif = getattr(self, "_tif", None)
    if tif is not None:
      tif.close()
      self._tif = None

  def _setup(self, page, num_levels: int) -> None:
    from tifffile import PHOTOMETRIC

    path = self.path
    self.height, self.width = int(page.imagelength), int(page.imagewidth)
    spp, dtype = int(page.samplesperpixel), np.dtype(page.dtype) if page.dtype is not None else None
    photometric = int(page.photometric)
    if dtype is None or dtype != np.uint8:
      kind = {"u": "unsigned", "i": "signed", "f": "float"}.get(dtype.kind if dtype else "", "?")
      bits = int(page.bitspersample)
      raise InputError(f"{path}: {bits}-bit {kind} TIFF samples are not supported; expected 8-bit "
                       "(uint8) RGB. Convert it to 8-bit first (16-bit and float images are refused "
                       "rather than guessed at)")
    names = {int(PHOTOMETRIC.RGB): "RGB", int(PHOTOMETRIC.MINISBLACK): "gray",
             int(PHOTOMETRIC.PALETTE): "palette", int(PHOTOMETRIC.YCBCR): "YCbCr"}
    kind = names.get(photometric)
    if kind is None or (kind in ("RGB", "YCbCr") and spp not in (3, 4)) or \
        (kind in ("gray", "palette") and spp != 1):
      try:
        pname = PHOTOMETRIC(photometric).name
      except ValueError:
        pname = str(photometric)
      raise InputError(f"{path}: TIFF photometric {pname} with {spp} samples per pixel is not "
                       "supported; expected 8-bit RGB (gray, palette and RGBA are converted)")
    self._kind, self._spp = kind, spp
    if kind == "YCbCr" and int(page.compression) not in (6, 7):
      raise InputError(f"{path}: uncompressed YCbCr TIFF is not supported; expected 8-bit RGB")
    if kind == "gray":
      _note(self.notes, f"{path}: gray TIFF converted to RGB")
    elif kind == "palette":
      _note(self.notes, f"{path}: palette TIFF converted to RGB")
      self._palette = (np.asarray(page.colormap, np.uint32) >> 8).astype(np.uint8).T  # [256, 3]
    if spp == 4:
      _note(self.notes, f"{path}: RGBA TIFF converted to RGB (alpha dropped)")
    self.pixel_size = _tiff_mpp(self._tif, page)
    if self.pixel_size.note:
      _note(self.notes, f"{path}: {self.pixel_size.note}")
    # Every segment must lie inside the file (a truncated download otherwise decodes as garbage).
    size = os.path.getsize(path)
    ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
    if len(ends) == 0 or ends.max() > size:
      raise InputError(f"{path}: truncated TIFF (image data runs to byte {int(ends.max()) if len(ends) else 0} "
                       f"of a {size}-byte file); expected a complete file")
    compression = page.compression.name if hasattr(page.compression, "name") else str(page.compression)
    self._tiled = bool(page.is_tiled)
    if self._tiled:
      self._seg_h, self._seg_w = int(page.tilelength), int(page.tilewidth)
    else:
      self._seg_h, self._seg_w = int(min(page.rowsperstrip, self.height)), self.width
    self._grid_w = -(-self.width // self._seg_w)
    seg_bytes = self._seg_h * self._seg_w * spp
    layout = (f"tiled {self._seg_w}x{self._seg_h}" if self._tiled else f"{len(ends)} strips of "
              f"{self._seg_h} rows")
    self.description = (f"TIFF ({'BigTIFF, ' if self._tif.is_bigtiff else ''}{layout}, "
                        f"{compression}, {kind}{', level 0 of ' + str(num_levels) if num_levels > 1 else ''})")
    self._whole: np.ndarray | None = None
    self._cache: dict[int, np.ndarray] = {}
    if int(page.planarconfig) != 1 and spp > 1:
      self.description += ", planar: read whole"
      logging.info("%s: samples stored planar: reading the whole image into memory", path)
      self._whole = self._convert(self._decode_page())
    elif seg_bytes > WHOLE_READ_SEGMENT_BYTES:
      self.description += ", read whole"
      self._whole = self._convert(self._decode_page())
    else:
      self.read(0, min(self.height, self._seg_h), 0, min(self.width, self._seg_w))  # fail early

  def _decode_error(self, e: Exception) -> InputError:
    msg = str(e)
    hint = ""
    if "imagecodecs" in msg or "KeyError" in type(e).__name__ or "compression" in msg.lower():
      hint = (" (decoding this compression needs the imagecodecs package: pip install imagecodecs; "
              "uncompressed, Deflate/zlib, LZMA and PackBits TIFFs work without it)")
    return InputError(f"{self.path}: cannot decode the TIFF image data ({type(e).__name__}: {e}){hint}")

  def _decode_page(self) -> np.ndarray:
    try:
      a = self._page.asarray()
    except Exception as e:
      raise self._decode_error(e) from e
    if a.ndim == 3 and int(self._page.planarconfig) != 1 and a.shape[0] == self._spp:
      a = np.moveaxis(a, 0, -1)
    return a

  def _convert(self, a: np.ndarray) -> np.ndarray:
    """Decoded samples [h, w(, s)] -> uint8[h, w, 3] RGB."""
    if self._kind == "palette":
      return self._palette[a if a.ndim == 2 else a[..., 0]]
    if a.ndim == 2 or a.shape[-1] == 1:
      g = a if a.ndim == 2 else a[..., 0]
      return np.repeat(g[..., None], 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])

  def _segment(self, index: int) -> np.ndarray:
    seg = self._cache.get(index)
    if seg is not None:
      return seg
    page = self._page
    fh = self._tif.filehandle
    offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
    try:
      if count == 0:  # an empty (sparse) segment reads as zeros
        seg = np.zeros((self._seg_h, self._seg_w, self._spp), np.uint8)
      else:
        with fh.lock:
          fh.seek(offset)
          data = fh.read(count)
        seg, _, shape = page.decode(data, index, jpegtables=page.jpegtables,
                                    jpegheader=page.jpegheader)
        seg = np.asarray(seg).reshape(shape[1:])  # (depth=1, h, w, s) -> (h, w, s)
    except InputError:
      raise
    except Exception as e:
      raise self._decode_error(e) from e
    self._cache[index] = seg
    return seg

  def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    self._check_window(y0, y1, x0, x1)
    if self._whole is not None:
      return self._whole[y0:y1, x0:x1]
    out = np.empty((y1 - y0, x1 - x0, self._spp), np.uint8)
    used = set()
    for ty in range(y0 // self._seg_h, (y1 - 1) // self._seg_h + 1):
      for tx in range(x0 // self._seg_w, (x1 - 1) // self._seg_w + 1):
        index = ty * self._grid_w + tx
        seg = self._segment(index)
        used.add(index)
        sy, sx = ty * self._seg_h, tx * self._seg_w
        a0, a1 = max(y0, sy), min(y1, sy + self._seg_h, sy + seg.shape[0])
        b0, b1 = max(x0, sx), min(x1, sx + self._seg_w, sx + seg.shape[1])
        if a1 > a0 and b1 > b0:
          out[a0 - y0:a1 - y0, b0 - x0:b1 - x0] = seg[a0 - sy:a1 - sy, b0 - sx:b1 - sx]
    for index in list(self._cache):
      if index not in used:
        del self._cache[index]
    return self._convert(out)

  def close(self) -> None:
    self._cache = {}
    self._whole = None
    self._close_file()


def is_tiff(path: str | os.PathLike) -> bool:
  """Whether the file starts with a TIFF or BigTIFF signature."""
  with open(path, "rb") as f:
    return f.read(4) in _TIFF_MAGIC


def open_image(path: str | os.PathLike) -> ImageSource:
  """Opens an input image for region reads (see the module docstring for formats and modes).

  TIFF is recognised by its signature (whatever the suffix), everything else goes to Pillow.

  Returns:
    an `ImageSource` (close it, or use it as a context manager).

  Raises:
    InputError: missing, unreadable, truncated or unsupported file (the message names it and what
      was expected).
  """
  path = Path(path)
  if not path.is_file():
    raise InputError(f"{path}: image file not found")
  try:
    tiff = is_tiff(path)
  except OSError as e:
    raise InputError(f"{path}: cannot read the file ({e})") from e
  return TiffSource(path) if tiff else _open_pil(path)


def list_inputs(spec: str) -> list[Path]:
  """The image files named by `predict.inputs`: a file, a folder (its files with a suffix in
  `SUFFIXES`, not recursive) or a glob pattern (`*`, `?`, `[...]`; `**` recurses).

  Returns:
    sorted list of files (a glob or folder keeps only known suffixes; a named file is kept as is).

  Raises:
    InputError: empty spec, a path that does not exist, or a folder / glob with no image files.
  """
  spec = str(spec or "").strip()
  if not spec:
    raise InputError("config key predict.inputs is empty; expected an image file, a folder of "
                     "images or a glob such as 'slides/*.tif'")
  path = Path(spec).expanduser()
  if any(ch in spec for ch in "*?["):
    files = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)]
    files = sorted(p for p in files if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
      raise InputError(f"config key predict.inputs: the pattern {spec!r} matches no image files "
                       f"(expected suffixes {', '.join(SUFFIXES)})")
    return files
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
      raise InputError(f"config key predict.inputs: the folder {path} holds no image files "
                       f"(expected suffixes {', '.join(SUFFIXES)})")
    return files
  if path.is_file():
    return [path]
  raise InputError(f"config key predict.inputs: {path} does not exist; expected an image file, a "
                   "folder of images or a glob")


def output_names(files: Iterable[Path]) -> list[str]:
  """One output name per input: the file stem; stems shared by several inputs get the suffix
  appended (`a.png`, `a.tif` -> `a_png`, `a_tif`), then the parent folder's name.

  Raises:
    InputError: two inputs would still share a name.
  """
  files = list(files)
  stems = [p.stem for p in files]
  names = [s if stems.count(s) == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}"
           for s, p in zip(stems, files)]
  names = [n if names.count(n) == 1 else f"{p.parent.name}_{n}" for n, p in zip(names, files)]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    clash = [str(p) for p, n in zip(files, names) if n in dup]
    raise InputError(f"config key predict.inputs: inputs {clash} would write the same outputs "
                     f"{dup}; rename one of them")
  return names


def downsample_factor(height: int, width: int, max_side: int) -> int:
  """Smallest integer f >= 1 with max(height, width) / f <= max_side (overlay size)."""
  return max(1, math.ceil(max(height, width) / max(1, int(max_side))))
