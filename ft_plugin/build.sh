#!/usr/bin/env bash
# The one command line that compiles and links libesparse_ft_plugin.so (CMake runs it; it also runs alone):
#   PY=.venv/bin/python bash ft_plugin/build.sh OUT.so [CUSPARSELT_INCLUDE_DIR] [CUBLASLT_LIB]
# torch's own extension flags (its include folders, C++20, its C++ ABI, -O2), torch's libraries by name, cudart,
# cuBLASLt, libdl and the shared libstdc++ (named, and checked after the link: on the GPU image a static copy of
# libstdc++ ended up inside the plugin and crashed every error message with a number in it; docs/gpu_path.md).
# No -DNDEBUG, no -soname, no strip; RPATH = torch's library folder.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT.so [CUSPARSELT_INCLUDE_DIR] [CUBLASLT_LIB]}
py=${PY:-python3}
read -r inc libdir cslt abi < <("$py" - <<'PY'
import glob, os, torch
from torch.utils.cpp_extension import include_paths
site = os.path.dirname(os.path.dirname(torch.__file__))
hdr = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparseLt.h")))
print(",".join(include_paths(device_type="cuda")), os.path.join(site, "torch", "lib"),
      os.path.dirname(hdr[0]) if hdr else "-", int(torch._C._GLIBCXX_USE_CXX11_ABI))
PY
)
cslt=${2:-$cslt}
cuda=${CUDA_HOME:-/usr/local/cuda}
cublaslt=${3:-}
if [ -n "$cublaslt" ]; then  # a pip wheel's cuBLASLt (nvidia/cu13/lib/libcublasLt.so.13) and its headers
  cublas_link=("$cublaslt" -I"$(dirname "$cublaslt")/../include")
else
  cublas_link=(-L"$cuda/lib64" -lcublasLt)
fi
inc=$(echo "$inc" | sed 's/^/-I/; s/,/ -I/g')
# shellcheck disable=SC2086
${CXX:-g++} -shared -fPIC -O2 -std=c++20 -D_GLIBCXX_USE_CXX11_ABI="$abi" $inc -I"$cslt" -I"$cuda/include" \
  "$here/csrc/cusparselt_api.cpp" "$here/csrc/sparse_linear.cpp" "$here/csrc/dense_linear.cpp" \
  -L"$libdir" -lc10 -lc10_cuda -ltorch -ltorch_cpu -ltorch_cuda -L"$cuda/lib64" -lcudart "${cublas_link[@]}" -ldl \
  -Wl,-Bdynamic -l:libstdc++.so.6 -Wl,-rpath,"$libdir" -o "$out.tmp"
# The C++ runtime must be the process's shared one: on the GPU image the compiler's implicit -lstdc++ pulled
# pieces of the static libstdc++ into the plugin, whose iostreams had no locale, so every error message with a
# number in it crashed the process (address 0x20 in std::ostream::_M_insert<long>; docs/gpu_path.md).
if nm -D --defined-only "$out.tmp" | grep -qE ' (T|W) (__cxa_throw|_ZNSo9_M_insertIlEERSoT_)$'; then
  echo "esparse: $out would carry its own copy of libstdc++ (linked statically); install the compiler's" \
       "libstdc++ development files (libstdc++-dev) so that -lstdc++ finds libstdc++.so" >&2
  rm -f "$out.tmp"; exit 1
fi
mv "$out.tmp" "$out"
echo "built $out"
