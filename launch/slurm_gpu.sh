#!/usr/bin/env bash
# SLURM, one process per GPU (e.g. 2 nodes x 8 GPUs). Submit with:
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm_gpu.sh \
#       configs/demo.py /shared/workdirs/run1 --config.tokenizer.export=DIR [--config.key=value ...]
# hmar_jax.distributed starts JAX's distributed runtime from the SLURM environment
# (SLURM_NTASKS > 1); JAX takes the coordinator from the first node of the step, the port
# from the job id (JAX_COORDINATOR_PORT overrides it) and gives each task the GPU of its
# SLURM_LOCALID, so every task must see all GPUs of its node (--gpus-per-node, not
# --gpus-per-task). Every process runs the same program and process 0 writes logs and
# exports. The workdir must be on storage that every node sees; compiled programs are
# cached in JAX_COMPILATION_CACHE_DIR (default WORKDIR/jax_cache).
#SBATCH --job-name=hmar
#SBATCH --time=48:00:00
set -euo pipefail
config="${1:?config file}"; workdir="${2:?shared workdir}"; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$workdir/jax_cache}"
srun --kill-on-bad-exit=1 "${PYTHON:-.venv/bin/python}" -m hmar_jax.train \
    --config "$config" --workdir "$workdir" "$@"
