#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with torch, esparse (editable) and its dev tools.
# On a machine with nvcc and a CUDA torch the ft_plugin is compiled too; elsewhere the pure-Python package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# the CPU build of torch unless one is already installed (a CUDA torch on a GPU machine is kept)
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q "scikit-build-core>=0.10" "cmake>=3.24" ninja
.venv/bin/python -m pip install -q --no-build-isolation -e ".[dev]"
.venv/bin/python -c "import esparse, torch; print('esparse', esparse.__version__, 'torch', torch.__version__)"
