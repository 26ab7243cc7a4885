#!/usr/bin/env bash
# Train one stage on a single GPU.
#
#   launch/train_1gpu.sh CONFIG WORKDIR [--config.x.y=value ...]
#   e.g. launch/train_1gpu.sh configs/cls.py runs/glas --config.data.dir=../shared/data/glas
#
# GPU=<index> picks the GPU (default 0). A run restarted with the same WORKDIR resumes from its newest
# checkpoint (exactly: same data order and augmentation). Needs a CUDA build of JAX
# (pip install -U "jax[cuda12]").
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,9p' "$0"; exit 2
fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES=${GPU:-0}
# Let XLA take GPU memory as needed instead of preallocating 75 % (friendlier to shared GPUs).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec "${PYTHON:-python}" -m oeem_jax.main --config="$config" --workdir="$workdir" "$@"
