"""Throughput of the tf.data input pipelines on this machine (augmented tiles/s and crops/s).

    python launch/bench_data.py [--data_dir ../shared/data/glas] [--images 20] [--batches 30]

Reads the first `--images` train images straight from a GlaS folder (no TFDS build; the synthetic set
when the folder is absent), then times `cls_dataset` (112 tiles -> 224 crops, batch 20, as the paper)
and `seg_dataset` (256 crops from full images, batch 8) after a warm-up. Prints one line per pipeline.
The figures are CPU-bound and depend on the number of free cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oeem_jax.data import glas, pipeline, synthetic, tiles  # noqa: E402
from oeem_jax.io_utils import default_glas_dir  # noqa: E402


def _time(ds, batch: int, warmup: int, batches: int) -> float:
  it = iter(ds)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - start)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data_dir", default=str(default_glas_dir()))
  ap.add_argument("--images", type=int, default=20)
  ap.add_argument("--batches", type=int, default=30)
  ap.add_argument("--warmup", type=int, default=5)
  args = ap.parse_args()

  folder = Path(args.data_dir)
  label = "GlaS"
  if not (folder / "Grade.csv").is_file():
    folder = synthetic.ensure_synthetic_glas(Path(tempfile.gettempdir()) / "oeem_bench", 12, 0)
    label = "SYNTHETIC"
  records = [r for r in glas.list_source(folder) if r.split == "train"][: args.images]
  images = [glas.decode_image(r.image_path) for r in records]
  masks = [glas.decode_mask(r.mask_path) for r in records]
  tile_x = np.concatenate([tiles.extract_tiles(im) for im in images])
  tile_y = np.concatenate([tiles.patch_labels(tiles.extract_tiles(m)) for m in masks])
  print(f"data: {label} {folder}, {len(images)} train images, {len(tile_x)} tiles; "
        f"{os.cpu_count()} CPUs visible")

  cls = pipeline.cls_dataset(tile_x, tile_y, input_size=224, global_batch_size=20, seed=0)
  rate = _time(cls.as_numpy_iterator(), 20, args.warmup, args.batches)
  print(f"cls_dataset: {rate:8.1f} tiles/s  (112 -> RandomResizedCrop 224, flips, normalise; batch 20)")

  seg = pipeline.seg_dataset(images, [(m > 0).astype(np.uint8) for m in masks], crop_size=256,
                             global_batch_size=8, seed=0)
  rate = _time(seg.as_numpy_iterator(), 8, args.warmup, args.batches)
  print(f"seg_dataset: {rate:8.1f} crops/s  (scale 0.75-3, crop 256, flip, photometric, normalise; batch 8)")


if __name__ == "__main__":
  main()
