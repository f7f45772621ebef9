#!/usr/bin/env bash
# TPU pod slice: runs the same command on every worker (gcloud must be configured).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/demo.py /mnt/shared/workdirs/run1 \
#       --config.tokenizer.export=DIR [--config...]
# Each worker needs this repository and its environment at the same path (REPO_DIR), and the
# workdir must be a POSIX path every worker sees (NFS or a mounted bucket).
# hmar_jax.distributed starts JAX's distributed runtime from the TPU environment; process 0
# writes logs and exports.
set -euo pipefail
tpu="${1:?TPU name}"; zone="${2:?zone}"; config="${3:?config file}"; workdir="${4:?workdir}"
shift 4
repo="${REPO_DIR:-~/hmar_jax}"
extra="$(printf ' %q' "$@")"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
    "cd $repo && .venv/bin/python -m hmar_jax.train --config $config --workdir $workdir$extra"
