#!/usr/bin/env bash
# TPU pod slice: runs the same training command on every worker (gcloud must be configured).
#   launch/tpu_pod.sh --install TPU_NAME ZONE     # once: JAX's TPU build on every worker
#   launch/tpu_pod.sh TPU_NAME ZONE configs/demo.py /mnt/shared/workdirs/run1 \
#       --config.tokenizer.export=DIR [--config...]
# Each worker needs this repository and its .venv at the same path (REPO_DIR, default
# ~/hmar_jax); --install adds jax[tpu] at the jax version of requirements.txt (libtpu comes
# from PyPI with it). The workdir must be a POSIX path every worker sees (NFS, Filestore or a
# mounted bucket). HMAR_JAX_DISTRIBUTED=1 tells hmar_jax.distributed that this process is
# one of the slice's workers: JAX then reads the worker count and index from the TPU VM's
# metadata. Compiled programs are cached in JAX_COMPILATION_CACHE_DIR (default
# WORKDIR/jax_cache, on the shared path), so a restart or a second run of the same shapes
# does not compile again. Process 0 writes logs and exports.
set -euo pipefail
repo="${REPO_DIR:-~/hmar_jax}"
if [ "${1:-}" = "--install" ]; then
  tpu="${2:?TPU name}"; zone="${3:?zone}"
  here="$(cd "$(dirname "$0")/.." && pwd)"
  jax_version="$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' "$here/requirements.txt")"
  [ -n "$jax_version" ] || { echo "error: no jax==VERSION line in requirements.txt" >&2; exit 2; }
  exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
      "cd $repo && .venv/bin/pip install 'jax[tpu]==$jax_version'"
fi
tpu="${1:?TPU name}"; zone="${2:?zone}"; config="${3:?config file}"; workdir="${4:?workdir}"
shift 4
cache="${JAX_COMPILATION_CACHE_DIR:-$workdir/jax_cache}"
extra="$(printf ' %q' "$@")"
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
    "cd $repo && HMAR_JAX_DISTRIBUTED=1 JAX_COMPILATION_CACHE_DIR=$(printf '%q' "$cache") .venv/bin/python -m hmar_jax.train --config $(printf '%q' "$config") --workdir $(printf '%q' "$workdir")$extra"
