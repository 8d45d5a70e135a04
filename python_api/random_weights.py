"""Random 2:4 weights of a named model shape (esparse/format/shapes.py): what the benchmarks and tests build a
model from without a download."""

from __future__ import annotations

import torch

from esparse.devices import dtype_name
from esparse.format.ft_format import LAYERS, layer_prefix, linear_specs, replicated_specs
from esparse.format.ft_loader import LayerWeights
from esparse.format.shapes import shape_config


def random_24(n: int, k: int, device, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    """A random [n, k] weight, scaled like a trained linear, with the 2 largest of every 4 along k kept."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, k, device=device, dtype=dtype, generator=g) * (k ** -0.5)
    keep = x.view(n, -1, 4).abs().topk(2, -1).indices
    mask = torch.zeros_like(x.view(n, -1, 4), dtype=torch.bool).scatter_(-1, keep, True)
    return (x.view(n, -1, 4) * mask).view(n, k)


class RandomWeights:
    """Random 2:4 weights of a named model shape, made on ``device`` a layer at a time when the loader asks (no
    download, nothing kept): a model built from them holds only what its layers keep, as from a folder."""

    def __init__(self, shape: str, device, dtype=torch.float16, layers: int | None = None, seed: int = 0):
        self.cfg = shape_config(shape, layers, dtype=dtype_name(dtype), sparsity="2:4", method="random")
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed

    def model_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for j, (name, (shp, _)) in enumerate(replicated_specs(self.cfg).items()):
            if name.startswith(LAYERS):
                continue
            g = torch.Generator(device=self.device).manual_seed(self.seed + j)
            t = torch.randn(shp, device=self.device, dtype=self.dtype, generator=g) * 0.02
            out[name] = torch.ones_like(t) if "layernorm.weight" in name else t
        return out

    def layer(self, i: int) -> LayerWeights:
        cfg, lw = self.cfg, LayerWeights(i)
        for name, (shp, _) in replicated_specs(cfg).items():
            if name.startswith(layer_prefix(i)):
                lw.tensors[name] = torch.ones(shp, device=self.device, dtype=self.dtype)
        for j, s in enumerate(linear_specs(cfg, i)):
            lw.linears[s.name] = random_24(s.n, s.k, self.device, self.dtype, self.seed + 1000 * i + j)
            if s.bias:
                lw.biases[s.bias_name] = torch.zeros(s.n, device=self.device, dtype=self.dtype)
                lw.tensors.pop(s.bias_name, None)
        return lw
