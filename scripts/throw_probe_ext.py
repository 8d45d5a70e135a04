"""Diagnostic: which C++ throws survive in a torch extension on this machine (built by cpp_extension)."""
import sys

import torch
from torch.utils.cpp_extension import load_inline

std = sys.argv[1] if len(sys.argv) > 1 else "c++17"
src = r'''
#include <torch/library.h>
#include <stdexcept>
int64_t a(int64_t k) { try { throw std::runtime_error("x"); } catch (const std::exception&) { return 1; } return 0; }
int64_t b(int64_t k) { try { TORCH_CHECK(k < 0, "boom"); } catch (const c10::Error&) { return 2; } return 0; }
int64_t c(int64_t k) { TORCH_CHECK(k < 0, "boom across"); return 0; }
TORCH_LIBRARY(probe, m) { m.def("a(int k) -> int", &a); m.def("b(int k) -> int", &b); m.def("c(int k) -> int", &c); }
'''
load_inline(f"probe_{std.replace('+', 'p')}", src, extra_cflags=[f"-std={std}", "-O2"], is_python_module=False,
            verbose=False)
print(std, "a", torch.ops.probe.a(1), flush=True)
print(std, "b", torch.ops.probe.b(1), flush=True)
try:
    torch.ops.probe.c(1)
except RuntimeError as e:
    print(std, "c ok:", str(e).splitlines()[0], flush=True)
