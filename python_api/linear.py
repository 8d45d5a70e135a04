"""The GEMM paths of the runtime's linears, swapped into a filled model (as gpt-fast swaps quantised linears).

* ``nn.Linear``: what the model declares; ``F.linear`` on a dense weight. The CPU path and the reference.
* ``PluginDenseLinear``: ft_plugin's cuBLASLt GEMM (the dense baseline of the benchmarks).
* ``NM24Linear`` (backend ``sparse``): the 2:4 weight in the exported compressed layout (values + 2-bit
  positions, 0.5625x the bytes), multiplied by our decode kernel (ft_plugin/nm24.py) for up to 64 tokens and,
  for more (prefill), expanded into one scratch buffer shared by the model and multiplied by cuBLAS. No
  cuSPARSELt needed; the dense copy is dropped once packed.
* ``PluginSparseLinear`` (backend ``cusparselt``): ft_plugin's cuSPARSELt 2:4 GEMM on a compressed weight
  (plan + searched algorithm cached per shape); the dense copy is dropped once compressed.
``swap_linears`` replaces a block's ``nn.Linear`` modules in place, fusing a following ReLU into the GEMM's
epilogue where the block allows it (OPT's w1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esparse.errors import EsparseError
from esparse.format.nm_pack import pack_nm

BACKENDS = ("torch", "dense", "sparse", "cusparselt")
SPARSE_BACKENDS = ("sparse", "cusparselt")


class NM24Linear(nn.Module):
    """A 2:4 linear in the exported compressed layout, on our kernel (decode) or expanded + cuBLAS (prefill)."""

    _scratch: dict[tuple, torch.Tensor] = {}  # one expansion buffer per (device, dtype), as large as the largest

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False):
        super().__init__()
        from esparse.ft_plugin import nm24

        n, k = weight.shape
        if not nm24.kernel_shape_ok(n, k):
            raise EsparseError(f"weight [{n}, {k}]: the 2:4 decode kernel needs K a multiple of 32; keep this "
                               "layer dense")
        packed = pack_nm(weight, 2, 4)  # refuses a weight that is not 2:4 along its input dim
        values, meta32 = nm24.pack_for_kernel(packed.values, packed.meta)
        self.register_buffer("values", values)
        self.register_buffer("meta", meta32)
        self.register_buffer("bias", bias)
        self.relu, self.n, self.k, self._nm24 = relu, n, k, nm24
        if weight.is_cuda:
            nm24._ops()  # registered here, not on a first call that torch.compile may be tracing

    def compressed_bytes(self) -> int:
        """Device bytes of the compressed weight: values and positions (0.5625x the dense fp16 bytes)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta))

    def _expanded(self) -> torch.Tensor:
        key = (self.values.device, self.values.dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < self.n * self.k:
            buf = torch.empty(self.n * self.k, device=self.values.device, dtype=self.values.dtype)
            NM24Linear._scratch[key] = buf
        return self._nm24.decompress(self.values, self.meta, buf[: self.n * self.k].view(self.n, self.k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.k <= self._nm24.SMALL_M_MAX:
            return self._nm24.linear(x, self.values, self.meta, self.bias, self.relu)
        y = F.linear(x, self._expanded(), self.bias)
        return F.relu(y) if self.relu else y


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
    """Put every ``nn.Linear`` of ``block`` on ``backend`` (torch | dense | sparse | cusparselt; dense and
    cusparselt need the built plugin, sparse needs Triton and a CUDA device). A module with ``relu_fused`` and
    no gate gets its w1's ReLU in the epilogue."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r}")
    if backend == "torch":
        return
    make = {"sparse": NM24Linear, "cusparselt": PluginSparseLinear, "dense": PluginDenseLinear}[backend]
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            relu = name == "w1" and hasattr(parent, "relu_fused") and not parent.gated
            bias = None if child.bias is None else child.bias.detach()
            setattr(parent, name, make(child.weight.detach(), bias, relu))
            if relu:
                parent.relu_fused = True
