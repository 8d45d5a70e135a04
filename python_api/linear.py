"""The linear layers of the runtime: one interface, three GEMM paths.

* ``TorchLinear``: ``F.linear`` on a dense weight. The CPU path and the reference.
* ``PluginDenseLinear``: ft_plugin's cuBLASLt GEMM (the dense baseline of the benchmarks).
* ``PluginSparseLinear``: ft_plugin's cuSPARSELt 2:4 GEMM on a compressed weight (plan + searched
  algorithm cached per shape); the dense copy is dropped once compressed.
The decoder switches between dense and sparse with one flag, and every path takes an optional fused
ReLU epilogue (OPT's fc1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TorchLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return F.relu(y) if self.relu else y


class PluginDenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False):
        super().__init__()
        from esparse.ft_plugin import ops

        self.weight, self.bias, self.relu, self._ops = weight, bias, relu, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.dense_linear(x, self.weight, self.bias, "relu" if self.relu else "none")


class PluginSparseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False):
        super().__init__()
        from esparse.ft_plugin import ops

        self.sparse = ops.SparseWeight(weight)  # validates 2:4 on the GPU, keeps only the compressed copy
        self.bias, self.relu, self._ops = bias, relu, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.sparse_linear(x, self.sparse, self.bias, "relu" if self.relu else "none")


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, backend: str, relu: bool = False) -> nn.Module:
    """backend: torch | dense | sparse (the last two need the built plugin and a CUDA device)."""
    if backend == "torch":
        return TorchLinear(weight, bias, relu)
    if backend == "dense":
        return PluginDenseLinear(weight, bias, relu)
    if backend == "sparse":
        return PluginSparseLinear(weight, bias, relu)
    raise ValueError(f"unknown linear backend {backend!r}")
