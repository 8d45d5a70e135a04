#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with torch, esparse (editable) and its dev tools.
# Where python3 already has a torch (a GPU image's CUDA build), the venv sees it (--system-site-packages) and
# the ft_plugin is compiled against it when nvcc is there; elsewhere the CPU torch from PyPI and the
# pure-Python package. ESPARSE_EXTRAS picks the extras (default dev); an offline machine can point
# PIP_FIND_LINKS at a folder of wheels with PIP_NO_INDEX=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if "$PY" -c "import torch" 2>/dev/null; then
  # python3's torch (possibly itself inside a venv, as on GPU images) stays visible from .venv through a .pth
  # file listing python3's site folders, after .venv's own
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$PY" -c "import site, sysconfig; print('\n'.join(dict.fromkeys([sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib'], *site.getsitepackages()])))" > "$site/zz_esparse_parent.pth"
fi
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || echo "setup: pip not upgraded (offline?)"
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q "scikit-build-core>=0.10" "cmake>=3.24" ninja
extras=${ESPARSE_EXTRAS-dev}
.venv/bin/python -m pip install -q --no-build-isolation -e ".${extras:+[$extras]}"
.venv/bin/python -c "import esparse, torch; print('esparse', esparse.__version__, 'torch', torch.__version__)"
.venv/bin/esparse env
