#!/usr/bin/env bash
# Train one stage over several hosts (GPU machines): run this same command on every host.
#
#   COORDINATOR=host0:12345 NUM_HOSTS=2 HOST_ID=<0..NUM_HOSTS-1> \
#     launch/train_multihost.sh CONFIG WORKDIR [--config.x.y=value ...]
#
# Each process calls jax.distributed.initialize() (it sees $JAX_COORDINATOR_ADDRESS; see
# oeem_jax.engine.parallel.setup_distributed), builds one mesh over every GPU of every host, and feeds only its
# own slice of each global batch. Requirements:
#   * WORKDIR on a filesystem all hosts share (NFS, GCS-fuse, ...): orbax writes one checkpoint
#     cooperatively and every host restores from it;
#   * the GlaS folder (--config.data.dir) readable on every host;
#   * train.batch_size divisible by the total GPU count.
# Under SLURM / Open MPI you can instead export OEEM_DISTRIBUTED=1 and let JAX detect the cluster.
set -euo pipefail
if [[ $# -lt 2 || -z "${COORDINATOR:-}" || -z "${NUM_HOSTS:-}" || -z "${HOST_ID:-}" ]]; then
  sed -n '2,16p' "$0"; exit 2
fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_HOSTS JAX_PROCESS_ID=$HOST_ID
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec "${PYTHON:-python}" -m oeem_jax.main --config="$config" --workdir="$workdir" "$@"
