"""Throughput of the tf.data input pipelines on this machine, and what one accelerator would need.

    python launch/bench_data.py [--data_dir ../shared/data/glas] [--images 20] [--batches 30] \
        [--threads 1,2] [--check_json check.json]

Reads the first `--images` train images straight from a GlaS folder (no TFDS build; the synthetic set
when the folder is absent), then times, after a warm-up and at the paper's batch sizes,
`cls_dataset` (112 tiles -> 224 crops, batch 20) and `seg_dataset` (256 crops from full images,
batch 32), once per `--threads` entry: the size of tf.data's private thread pool
(`tf.data.Options().threading.private_threadpool_size`, what the pipeline's parallel map runs on).

Then the rate an accelerator needs: batch / step time, with the step time and batch of a
launch/accelerator_check.py JSON (`--check_json`; the fastest dtype measured) or else the targets of
issue 15 (cls 30 ms, seg 50 ms per step, at the paper's batches), and the host cores that takes at
the measured rate per thread (the 1-thread rate; more threads scale at most linearly). The figures
are CPU-bound and depend on the number of free cores: say the machine's load when quoting them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from dev_paths import default_glas_dir  # launch/dev_paths.py, beside this script

from oeem_jax.data import pipeline, synthetic, tiles
from oeem_jax.data import source as glas_source

# The paper's batches (configs/cls.py, configs/seg_oeem.py) and issue 15's per-step targets (s).
CLS_BATCH, SEG_BATCH = 20, 32
TARGET_STEP_S = {"cls": 0.030, "seg": 0.050}


def _time(ds, batch: int, warmup: int, batches: int) -> float:
  it = iter(ds)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - start)


def _with_threads(ds, threads: int):
  import tensorflow as tf

  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  return ds.with_options(options)


def step_times(check_json: str | None) -> tuple[dict[str, tuple[float, int]], str]:
  """(seconds per step, batch) of cls and seg: the fastest median of each in an accelerator_check
  JSON with the batch it was timed at, or else the issue-15 targets at the paper's batches.
  Returns (that, where it comes from).

  Raises:
    ValueError: the JSON holds no measured cls or seg step.
  """
  if not check_json:
    return ({"cls": (TARGET_STEP_S["cls"], CLS_BATCH), "seg": (TARGET_STEP_S["seg"], SEG_BATCH)},
            "targets of issue 15")
  with open(check_json) as f:
    result = json.load(f)
  out = {}
  for kind in ("cls", "seg"):
    timed = [r for key, r in result.get("steps", {}).items() if key.split()[0] == kind and "median_s" in r]
    if not timed:
      raise ValueError(f"--check_json {check_json}: no measured {kind} step (parts cls and seg)")
    best = min(timed, key=lambda r: r["median_s"])
    out[kind] = (best["median_s"], int(best["batch"]))
  device = result.get("environment", {}).get("device_kind", "?")
  return out, f"{check_json} ({device}{', TINY' if result.get('tiny') else ''})"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data_dir", default=str(default_glas_dir()))
  ap.add_argument("--images", type=int, default=20)
  ap.add_argument("--batches", type=int, default=30)
  ap.add_argument("--warmup", type=int, default=5)
  ap.add_argument("--threads", default="1,2", help="comma list of tf.data private thread pool sizes")
  ap.add_argument("--check_json", default="", help="launch/accelerator_check.py output for the step times")
  args = ap.parse_args()
  try:
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
  except ValueError:
    ap.error(f"--threads: expected a comma list of integers >= 1, got {args.threads!r}")
  if not threads or min(threads) < 1:
    ap.error(f"--threads: expected a comma list of integers >= 1, got {args.threads!r}")
  if args.images < 1 or args.batches < 1 or args.warmup < 0:
    ap.error("--images and --batches must be >= 1, --warmup >= 0")
  try:
    need_s, source = step_times(args.check_json)
  except (OSError, ValueError, KeyError) as e:
    ap.error(f"--check_json: {e}")

  folder = Path(args.data_dir)
  label = "GlaS"
  if not (folder / "Grade.csv").is_file():
    folder = synthetic.ensure_synthetic_glas(Path(tempfile.gettempdir()) / "oeem_bench", 12, 0)
    label = "SYNTHETIC"
  records = [r for r in glas_source.list_source(folder) if r.split == "train"][: args.images]
  images = [glas_source.decode_image(r.image_path) for r in records]
  masks = [glas_source.decode_mask(r.mask_path) for r in records]
  tile_x = np.concatenate([tiles.extract_tiles(im) for im in images])
  tile_y = np.concatenate([tiles.patch_labels(tiles.extract_tiles(m)) for m in masks])
  print(f"data: {label} {folder}, {len(images)} train images, {len(tile_x)} tiles; "
        f"{os.cpu_count()} CPUs visible, loadavg {os.getloadavg()}")

  rates: dict[str, dict[int, float]] = {"cls": {}, "seg": {}}
  for n in threads:
    cls = pipeline.cls_dataset(tile_x, tile_y, input_size=224, global_batch_size=CLS_BATCH, seed=0)
    rates["cls"][n] = _time(_with_threads(cls, n).as_numpy_iterator(), CLS_BATCH, args.warmup, args.batches)
    print(f"cls_dataset, {n} thread(s): {rates['cls'][n]:8.1f} tiles/s  "
          f"(112 -> RandomResizedCrop 224, flips, normalise; batch {CLS_BATCH})", flush=True)
    seg = pipeline.seg_dataset(images, [(m > 0).astype(np.uint8) for m in masks], crop_size=256,
                               global_batch_size=SEG_BATCH, seed=0)
    rates["seg"][n] = _time(_with_threads(seg, n).as_numpy_iterator(), SEG_BATCH, args.warmup, args.batches)
    print(f"seg_dataset, {n} thread(s): {rates['seg'][n]:8.1f} crops/s  "
          f"(scale 0.75-3, crop 256, flip, photometric, normalise; batch {SEG_BATCH})", flush=True)

  print(f"\none accelerator at the step times of {source}:")
  one = min(threads)
  for kind, unit in (("cls", "tiles/s"), ("seg", "crops/s")):
    step_s, batch = need_s[kind]
    needed = batch / step_s
    per_thread = rates[kind][one] / one
    print(f"  {kind}: {1e3 * step_s:.1f} ms/step x batch {batch} -> needs {needed:.0f} {unit}; "
          f"at {per_thread:.1f} {unit} per thread that is >= {math.ceil(needed / per_thread)} host cores")


if __name__ == "__main__":
  main()
