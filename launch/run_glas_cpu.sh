#!/usr/bin/env bash
# The CPU-sized real run on GlaS (README "Results"): the OEEM pipeline, then the plain-CE baseline
# ("ours w/o OEEM") trained on the same pseudo-masks and from the same classifier backbone, then the
# fully supervised upper bound (true masks, same backbone init), each with its evaluation.
#   bash launch/run_glas_cpu.sh [GLAS_DIR] [OUT_DIR]
# Each stage resumes / is skipped when its outputs are complete, so the script can be rerun.
set -euo pipefail
GLAS=${1:-../shared/data/glas}
OUT=${2:-runs/glas_cpu}
PY=${PYTHON:-python}
start=$(date +%s)
$PY -m oeem_jax.main --config=configs/pipeline.py:cpu --config.data.dir="$GLAS" --workdir="$OUT/oeem"
echo "oeem pipeline: $(( $(date +%s) - start )) s"
if [ ! -f "$OUT/ce/seg/summary.json" ]; then
  $PY -m oeem_jax.main --config=configs/seg_ce.py:cpu --config.data.dir="$GLAS" \
      --config.seg.pseudo_dir="$OUT/oeem/cam/pseudo_masks" --config.seg.backbone_init="$OUT/oeem/cls" \
      --workdir="$OUT/ce"
fi
if [ ! -f "$OUT/ce/eval/summary.json" ]; then
  $PY -m oeem_jax.main --config=configs/eval.py:cpu --config.data.dir="$GLAS" --workdir="$OUT/ce"
fi
echo "ce baseline done: $(( $(date +%s) - start )) s"
if [ "${SKIP_FULL:-0}" != 1 ]; then
  if [ ! -f "$OUT/full/seg/summary.json" ]; then
    # The README's upper bound was measured at 2,000 steps (FULL_STEPS=4000 matches the weak runs).
    $PY -m oeem_jax.main --config=configs/seg_full.py:cpu --config.data.dir="$GLAS" \
        --config.seg.backbone_init="$OUT/oeem/cls" --config.train.steps="${FULL_STEPS:-2000}" \
        --workdir="$OUT/full"
  fi
  if [ ! -f "$OUT/full/eval/summary.json" ]; then
    $PY -m oeem_jax.main --config=configs/eval.py:cpu --config.data.dir="$GLAS" --workdir="$OUT/full"
  fi
fi
echo "total: $(( $(date +%s) - start )) s"
