r"""Seconds per megapixel and peak memory of stage predict as the input grows.

    python launch/bench_predict.py --sizes=1000,2000,3000 --out=/tmp/bench_predict
    python launch/bench_predict.py --model=W/export/model --sizes=1000,5000,10000   # a real model
    python launch/bench_predict.py --model=W/export/model --scales=1.0 --flip=false   # its cheapest settings

Each size runs in a fresh subprocess, which reports its own peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss` after predict): a tiled TIFF of N x N px is tiled from the synthetic H&E drawing, then stage predict runs on it
with the same settings. Without --model, a tiny randomly initialised PSPNet (ResNet38 width 1/16,
window 48, one scale, no flip) stands in: it measures the plumbing (region reads, masks, labels,
polygons, CSV, overlay), not a segmenter's speed. Prints a Markdown table; `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_tiff(path: Path, side: int, tile: int = 512) -> None:
  """A side x side RGB tiled TIFF (Deflate), tile by tile, from one synthetic drawing."""
  import numpy as np
  import tifffile

  from oeem_jax.data import synthetic

  base = synthetic.draw_example(np.random.default_rng(0), False, 512, 512)[0]

  def tiles():
    for y in range(0, side, tile):
      for x in range(0, side, tile):
        yield np.roll(base, (y // 7 + x // 5) % 97, axis=1)

  tifffile.imwrite(path, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile),
                   photometric="rgb", compression="zlib", bigtiff=side * side * 3 > 2**31,
                   resolution=(1e4 / 0.62, 1e4 / 0.62), resolutionunit="CENTIMETER")


def tiny_model(out: Path) -> Path:
  from oeem_jax.predict import model_folder
  model = model_folder.build_network({"network": model_folder.TINY_NETWORK})
  variables = model_folder.random_variables(model)
  return model_folder.write_model_folder(out, model_folder.random_model_card(variables, flip=False),
                                         variables)


def child(args) -> None:
  """Runs predict on one image; prints one JSON line."""
  from oeem_jax import stages
  from oeem_jax.config.base import load_config_file

  c = load_config_file("predict").get_config()
  c.predict.model, c.predict.inputs = args.model, args.image
  c.predict.region_size = args.region_size
  if args.scales:
    c.predict.scales = tuple(float(v) for v in args.scales.split(","))
  if args.flip:
    c.predict.flip = args.flip == "true"
  start = time.time()
  s = stages.run_stage(c, args.workdir)
  rec = s["images"][0]
  print("RESULT " + json.dumps({"seconds": time.time() - start, "glands": rec["num_glands"],
                                "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                "regions": json.loads(Path(rec["outputs"]["mask"]).parent.parent.joinpath(
                                    "records", rec["name"] + ".json").read_text())["num_regions"]}))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="1000,2000,3000", help="image sides in px, comma-separated")
  p.add_argument("--model", default="", help="model folder (default: a tiny random one)")
  p.add_argument("--region_size", type=int, default=1024)
  p.add_argument("--scales", default="", help="e.g. 1.0 or 0.75,1,1.25 (default: the model's)")
  p.add_argument("--flip", default="", choices=("", "true", "false"), help="default: the model's")
  p.add_argument("--out", default="", help="work folder (default: a temp folder)")
  p.add_argument("--json", default="", help="also write the rows here")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--image", default="", help=argparse.SUPPRESS)
  p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    child(args)
    return
  out = Path(args.out or tempfile.mkdtemp(prefix="bench_predict_"))
  out.mkdir(parents=True, exist_ok=True)
  model = args.model or str(tiny_model(out / "tiny_model"))
  rows = []
  for side in (int(s) for s in args.sizes.split(",")):
    image = out / f"img_{side}.tif"
    if not image.is_file():
      make_tiff(image, side)
    cmd = [sys.executable, __file__, "--child", f"--model={model}", f"--image={image}",
           f"--workdir={out / f'run_{side}'}", f"--region_size={args.region_size}",
           f"--scales={args.scales}", f"--flip={args.flip}"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
      sys.exit(f"size {side}: predict failed:\n{res.stderr[-3000:]}")
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    mp = side * side / 1e6
    rows.append({"side": side, "megapixels": mp, "seconds": r["seconds"], "s_per_mp": r["seconds"] / mp,
                 "peak_rss_mib": r["peak_rss_kib"] / 1024, "glands": r["glands"],
                 "regions": r["regions"]})
    print(f"{side} px: {r['seconds']:.1f} s, peak RSS {r['peak_rss_kib'] / 1024:.0f} MiB",
          flush=True)
  print("\n| image | megapixels | regions | seconds | s / MP | peak RSS (MiB) | glands |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['side']} x {r['side']} | {r['megapixels']:.1f} | {r['regions']} | {r['seconds']:.1f} | "
          f"{r['s_per_mp']:.1f} | {r['peak_rss_mib']:.0f} | {r['glands']} |")
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  main()
