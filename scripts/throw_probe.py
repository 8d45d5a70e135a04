"""Diagnostic: a C++ error inside an esparse op reaches Python as an EsparseError (not a crash)."""
import torch

from esparse.errors import EsparseError
from esparse.ft_plugin import ops

sw = ops.SparseWeight(torch.zeros(128, 256, device="cuda", dtype=torch.float16))
y = torch.ops.esparse.sparse_linear(torch.zeros(4, 64, device="cuda", dtype=torch.float16), sw.obj, None, 0)
print("op returned", y, "last_error:", torch.ops.esparse.last_error())
try:
    ops.SparseWeight(torch.zeros(128, 256, device="cuda", dtype=torch.float16)).obj.build(torch.zeros(4, 4))
except EsparseError as e:
    print("EsparseError", e)
