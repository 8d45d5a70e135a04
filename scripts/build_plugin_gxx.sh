#!/usr/bin/env bash
# Diagnostic: build the plugin with plain g++ and torch's cpp_extension flags (no CMake), into $1.
set -euo pipefail
out=${1:-/tmp/libesparse_ft_plugin.so}
py=${PY:-.venv/bin/python}
read -r inc libdir cslt < <($py - <<'PY'
import os, torch
from torch.utils.cpp_extension import include_paths
import glob
site = os.path.dirname(os.path.dirname(torch.__file__))
hdr = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparseLt.h")))[0]
print(",".join(include_paths(device_type="cuda")), os.path.join(site, "torch", "lib"), os.path.dirname(hdr))
PY
)
cuda=${CUDA_HOME:-/usr/local/cuda}
inc=$(echo "$inc" | sed 's/^/-I/; s/,/ -I/g')
g++ -shared -fPIC -O2 -std=c++20 -D_GLIBCXX_USE_CXX11_ABI=1 $inc -I"$cslt" -I"$cuda/include" \
  ft_plugin/csrc/cusparselt_api.cpp ft_plugin/csrc/sparse_linear.cpp ft_plugin/csrc/dense_linear.cpp \
  -L"$libdir" -lc10 -lc10_cuda -ltorch -ltorch_cpu -ltorch_cuda -L"$cuda/lib64" -lcudart -lcublasLt -ldl \
  -Wl,-rpath,"$libdir" -o "$out"
echo "built $out"
