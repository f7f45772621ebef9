#!/usr/bin/env bash
# Creates the virtual environment $1 with a Python >= 3.12 if it does not exist yet.
# Looks for python3.13/python3.12 on PATH, then for a pyenv-installed 3.12/3.13.
set -euo pipefail
venv="${1:-.venv}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  exit 0
fi
rm -rf "$venv"
candidates=()
for name in python3.13 python3.12 python3; do
  command -v "$name" >/dev/null 2>&1 && candidates+=("$(command -v "$name")")
done
if command -v pyenv >/dev/null 2>&1; then
  root="$(pyenv root)"
  for dir in "$root"/versions/3.13* "$root"/versions/3.12*; do
    [ -x "$dir/bin/python" ] && candidates+=("$dir/bin/python")
  done
fi
for python in "${candidates[@]}"; do
  if "$python" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    echo "creating $venv with $python ($("$python" --version))"
    "$python" -m venv "$venv"
    exit 0
  fi
done
echo "error: hmar_jax needs Python >= 3.12 (jax 0.11 has no wheels for older versions)." >&2
echo "Install one (e.g. 'pyenv install 3.12') and run make again." >&2
exit 1
