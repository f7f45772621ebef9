#!/usr/bin/env bash
# Single machine (CPU, one GPU or all local GPUs; the mesh uses every local device).
#   launch/local.sh configs/demo.py workdirs/demo --config.tokenizer.export=DIR [--config.key=value ...]
set -euo pipefail
config="${1:?config file, e.g. configs/demo.py}"; workdir="${2:?workdir}"; shift 2
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m hmar_jax.train --config "$config" --workdir "$workdir" "$@"
