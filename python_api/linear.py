"""The GEMM paths of the runtime's linears, swapped into a filled model (as gpt-fast swaps quantised linears).

* ``nn.Linear``: what the model declares; ``F.linear`` on a dense weight. The CPU path and the reference.
* ``PluginDenseLinear``: ft_plugin's cuBLASLt GEMM (the dense baseline of the benchmarks).
* ``PluginSparseLinear``: ft_plugin's cuSPARSELt 2:4 GEMM on a compressed weight (plan + searched algorithm
  cached per shape); the dense copy is dropped once compressed.
``swap_linears`` replaces a block's ``nn.Linear`` modules in place, fusing a following ReLU into the GEMM's
epilogue where the block allows it (OPT's w1).
"""

from __future__ import annotations

import torch
from torch import nn

BACKENDS = ("torch", "dense", "sparse")


class PluginDenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False):
        super().__init__()
        from esparse.ft_plugin import ops

        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.relu, self._ops = relu, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.dense_linear(x, self.weight, self.bias, "relu" if self.relu else "none")


class PluginSparseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False):
        super().__init__()
        from esparse.ft_plugin import ops

        self.sparse = ops.SparseWeight(weight)  # validates 2:4 on the GPU, keeps only the compressed copy
        self.register_buffer("bias", bias)
        self.relu, self._ops = relu, ops

    def compressed_bytes(self) -> int:
        """Device bytes of the compressed weight (values and cuSPARSELt's metadata)."""
        return self.sparse.nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.sparse_linear(x, self.sparse, self.bias, "relu" if self.relu else "none")


def swap_linears(block: nn.Module, backend: str) -> None:
    """Put every ``nn.Linear`` of ``block`` on ``backend`` (torch | dense | sparse; the last two need the built
    plugin and a CUDA device). A module with ``relu_fused`` and no gate gets its w1's ReLU in the epilogue."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r}")
    if backend == "torch":
        return
    make = PluginSparseLinear if backend == "sparse" else PluginDenseLinear
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            relu = name == "w1" and hasattr(parent, "relu_fused") and not parent.gated
            bias = None if child.bias is None else child.bias.detach()
            setattr(parent, name, make(child.weight.detach(), bias, relu))
            if relu:
                parent.relu_fused = True
