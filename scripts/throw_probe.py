"""Diagnostic: does a C++ error raised inside an esparse op reach Python as an exception (not a crash)?"""
import torch

from esparse.ft_plugin import ops

sw = ops.SparseWeight(torch.zeros(128, 256, device="cuda", dtype=torch.float16))
try:
    torch.ops.esparse.sparse_linear(torch.zeros(4, 64, device="cuda", dtype=torch.float16), sw.obj, None, 0)
except RuntimeError as e:
    print("C++ error reached Python:", str(e).splitlines()[0])
