"""Small file helpers: atomic writes (temp name, then rename) that respect the umask, removal of
folders a failed run left empty, and repository paths."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

def cache_root(data_cfg) -> Path:
  """The cache folder: `data.cache_dir`, else `$XDG_CACHE_HOME/oeem_jax`, else `~/.cache/oeem_jax`.

  Args:
    data_cfg: the `data` config section (a ConfigDict or any object with `get` / attributes); None
      or a missing `cache_dir` means the default.
  """
  d = None
  if data_cfg is not None:
    try:
      d = data_cfg.get("cache_dir", "") if hasattr(data_cfg, "get") else getattr(data_cfg, "cache_dir", "")
    except AttributeError:
      d = None
  if d:
    return Path(d).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  return (Path(xdg) if xdg else Path.home() / ".cache") / "oeem_jax"


def _json_default(obj: Any):
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating,)):
    return float(obj)
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, Path):
    return str(obj)
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def current_umask() -> int:
  """The process umask (e.g. 0o022), read from /proc/self/status where Linux offers it (no change
  of the process state), else by setting and restoring it."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  """Writes `data` to `path` via a temp file in the same folder and an atomic rename.

  A crash leaves either the old file or the new one, never a half-written file. The file gets the
  mode a plain `open(path, "w")` would give it: 0o666 minus the umask (0644 under umask 022),
  not the 0600 of `tempfile.mkstemp`.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    os.fchmod(fd, 0o666 & ~current_umask())
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def remove_if_empty(path: str | os.PathLike) -> bool:
  """Removes the folder `path` if it holds no file (only, possibly nested, empty folders).

  Returns:
    True when it was removed; False when it holds a file or does not exist.
  """
  path = Path(path)
  if not path.is_dir():
    return False
  if any(not p.is_dir() for p in path.rglob("*")):
    return False
  for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
    sub.rmdir()
  path.rmdir()
  return True


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
  """Writes `obj` as indented JSON (numpy scalars/arrays converted) atomically."""
  text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default, allow_nan=True)
  return atomic_write_bytes(path, (text + "\n").encode())


def atomic_write_png(path: str | os.PathLike, array: np.ndarray, palette: list[int] | None = None) -> Path:
  """Writes a uint8 array (H, W) or (H, W, 3) as PNG atomically; optional palette for (H, W)."""
  import io

  from PIL import Image

  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"{path}: expected uint8 array, got {array.dtype}")
  if palette is not None:
    if array.ndim != 2:
      raise ValueError(f"{path}: a palette PNG needs a 2-D index array, got shape {array.shape}")
    img = Image.frombytes("P", (array.shape[1], array.shape[0]), np.ascontiguousarray(array).tobytes())
    img.putpalette(palette)
  else:
    img = Image.fromarray(array)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return atomic_write_bytes(path, buf.getvalue())


def atomic_write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
  """Writes a dict of arrays as an uncompressed .npz atomically (keys may contain '/')."""
  import io

  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return atomic_write_bytes(path, buf.getvalue())


class atomic_path:
  """Context manager for writers that want a file name (e.g. tifffile): yields a temp path in the
  folder of `path`; on a clean exit the temp file is fsynced and renamed to `path`, on an exception
  it is deleted (a crash leaves the old file or the new one, never half of one). The file gets
  0o666 minus the umask, as `atomic_write_bytes`.

      with atomic_path("out/mask.tif") as tmp:
        tifffile.imwrite(tmp, mask)
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)

  def __enter__(self) -> Path:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
    os.close(fd)
    self.tmp = Path(tmp)
    return self.tmp

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if exc_type is None:
        with open(self.tmp, "rb+") as f:
          os.fchmod(f.fileno(), 0o666 & ~current_umask())  # as atomic_write_bytes: not mkstemp's 0600
          os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
    finally:
      if self.tmp.exists():
        self.tmp.unlink()
