#!/usr/bin/env bash
# SLURM, one process per GPU (e.g. 2 nodes x 8 GPUs). Submit with:
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-task=1 launch/slurm_gpu.sh \
#       configs/demo.py /shared/workdirs/run1 --config.tokenizer.export=DIR [--config.key=value ...]
# hmar_jax.distributed starts JAX's distributed runtime from the SLURM environment
# (SLURM_NTASKS > 1), every process runs the same program, and process 0 writes logs and
# exports. The workdir must
# be on storage that every node sees.
#SBATCH --job-name=hmar
#SBATCH --time=48:00:00
set -euo pipefail
config="${1:?config file}"; workdir="${2:?shared workdir}"; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
srun --kill-on-bad-exit=1 "${PYTHON:-.venv/bin/python}" -m hmar_jax.train \
    --config "$config" --workdir "$workdir" "$@"
