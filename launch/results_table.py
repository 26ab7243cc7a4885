r"""Prints the README's results table (markdown) from finished run folders.

    python launch/results_table.py runs/glas_cpu/oeem runs/glas_cpu/ce [...]

Each argument is a WORKDIR holding `eval/metrics.json` (and, when present, `cls/`, `cam/`, `seg/`
summaries). Prints one row per workdir and split with the paper's columns (mIoU, the reference's
derived Dice = 2·mIoU/(1+mIoU), pixel Dice/F1 of the gland class) and the GlaS object metrics, then
the pseudo-mask columns of Table 2 and the wall times of every stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from oeem_jax.runtime import artifacts


def _load(path: Path) -> dict | None:
  return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  print("| run | split | mIoU | Dice (ref. 2m/(1+m)) | pixel Dice = F1 | object F1 | object Dice | object Hausdorff |")
  print("|---|---|---|---|---|---|---|---|")
  extra = []
  for arg in argv[1:]:
    w = Path(arg)
    m = _load(artifacts.eval_metrics_path(artifacts.stage_dir(w, "eval")))
    if m is None:
      print(f"| {w.name} | (no eval/metrics.json) | | | | | | |")
      continue
    for split in ("test_a", "test_b", "test"):
      if split not in m["splits"]:
        continue
      p, o = m["splits"][split]["pixel"], m["splits"][split]["object"]
      print(f"| {w.name} | {split} | {100 * p['miou']:.2f} | {100 * p['reference_dice']:.2f} | "
            f"{100 * p['dice']:.2f} | {100 * o['f1']:.2f} | {100 * o['dice']:.2f} | {o['hausdorff']:.1f} |")
    times = {}
    for stage in ("cls", "cam", "seg", "eval"):
      s = _load(artifacts.summary_path(w, stage))
      if s:
        times[stage] = s["wall_time_s"]
        if stage == "cam":
          extra.append(f"{w.name}: CAM mIoU {100 * s['cam_miou']:.2f}, pseudo-mask mIoU "
                       f"{100 * s['pseudo_mask_miou']:.2f} on {s['num_images']} training images")
        if stage in ("cls", "seg") and s.get("best_eval"):
          extra.append(f"{w.name}: {stage} best validation {json.dumps(s['best_eval'])}")
    extra.append(f"{w.name}: wall time per stage (s) {json.dumps(times)}")
  print()
  for line in extra:
    print(f"- {line}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
