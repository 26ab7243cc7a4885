"""Stage `prepare`: build the GlaS TFDS dataset (or the synthetic stand-in) and summarise it.

    python -m oeem_jax.main --config=configs/prepare.py --config.data.dir=/path/to/glas --workdir=DIR

Writes `DIR/prepare/summary.json` (through `stages.run_stage`) with: split counts, validation names,
image-size histogram ("WxH": count) per split, tile counts and tile-label pattern counts per split
(`[1,0]` non-gland only, `[0,1]` gland only, `[1,1]` both), the per-channel mean/std of the training
images on 0..1 RGB, the `synthetic` flag (with a loud `data_label`), the source folder, the notes of
the data checks (`notes`: colour conversions, Grade.csv rows without an image, ...) and the masks
that looked binary and were split into instances (`binary_masks`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np

from oeem_jax.data import loader, source, tiles

PATTERNS = {"[1,0]": (1, 0), "[0,1]": (0, 1), "[1,1]": (1, 1)}


def rgb_stats(images: Sequence[np.ndarray]) -> dict[str, list[float]]:
  """Pixel-weighted per-channel mean and (population) std of uint8 RGB images on 0..1.

  Args:
    images: uint8[H_n, W_n, 3] arrays.

  Returns:
    {"mean": [r, g, b], "std": [r, g, b], "pixels": count}.
  """
  total = np.zeros(3, np.float64)
  sq = np.zeros(3, np.float64)
  n = 0
  for im in images:
    x = im.reshape(-1, 3).astype(np.float64) / 255.0
    total += x.sum(0)
    sq += np.square(x).sum(0)
    n += x.shape[0]
  if n == 0:
    return {"mean": [float("nan")] * 3, "std": [float("nan")] * 3, "pixels": 0}
  mean = total / n
  std = np.sqrt(np.maximum(sq / n - mean ** 2, 0.0))
  return {"mean": [round(float(v), 5) for v in mean], "std": [round(float(v), 5) for v in std], "pixels": n}


def tile_summary(examples: Sequence[source.Example], tile: int, stride: int, threshold: float) -> dict[str, Any]:
  """Tile count and label-pattern counts ([1,0], [0,1], [1,1]) over `examples`."""
  counts = Counter()
  n = 0
  for e in examples:
    _, labels = tiles.example_tiles(e, tile, stride, threshold, images=False)
    n += labels.shape[0]
    for key, pat in PATTERNS.items():
      counts[key] += int(np.all(labels == np.array(pat, np.uint8), axis=1).sum())
  return {"tiles": n, "labels": {k: counts[k] for k in PATTERNS}}


def run(config: ml_collections.ConfigDict, stage_dir: Path) -> dict[str, Any]:
  """Builds the dataset and returns the summary fields (see module docstring)."""
  del stage_dir  # everything goes into summary.json
  d = config.data
  data = loader.load_splits(d)
  per_split = {}
  all_sizes: Counter = Counter()
  for split in ("train", "val", "test_a", "test_b"):
    exs = data.splits[split]
    sizes = Counter(f"{e.image.shape[1]}x{e.image.shape[0]}" for e in exs)
    all_sizes.update(sizes)
    per_split[split] = {
        "images": len(exs),
        "image_sizes": dict(sorted(sizes.items())),
        **tile_summary(exs, d.tile_size, d.tile_stride, d.label_threshold),
    }
  counts = data.counts()
  label = "SYNTHETIC (not GlaS; never report accuracy on it)" if data.synthetic else "GlaS"
  train_tiles = per_split["train"]
  final = (f"prepare [{label}] {data.source}: train {counts['train']} + val {counts['val']}, "
           f"test_a {counts['test_a']}, test_b {counts['test_b']}; {train_tiles['tiles']} train tiles "
           f"(labels {train_tiles['labels']})")
  if data.synthetic:
    final += "; for GlaS pass --config.data.dir=/path/to/glas"
  return {
      "synthetic": data.synthetic,
      "data_label": label,
      "source": data.source,
      "cache_dir": data.cache_dir,
      "counts": counts,
      "val_names": data.val_names,
      "image_sizes": dict(sorted(all_sizes.items())),
      "splits": per_split,
      "tile_size": d.tile_size,
      "tile_stride": d.tile_stride,
      "label_threshold": d.label_threshold,
      "rgb_stats": {
          "train": rgb_stats([e.image for e in data.splits["train"]]),
          "train+val": rgb_stats([e.image for e in data.splits["train"] + data.splits["val"]]),
      },
      "notes": data.notes,
      # Masks whose gland instances were derived from connected components (source.binary_to_instances).
      "binary_masks": [n.split(": mask looks binary")[0] for n in data.notes if ": mask looks binary" in n],
      "final_line": final,
  }
