"""Fill a :class:`Transformer` from an exported folder (or any source of layer weights), then swap its linears.

The model is declared on the meta device (no memory), then one layer at a time: the stored tensors go to the
device (compressed N:M linears move compressed, 0.5625x the bytes, and are unpacked there), are assigned into
the block's modules, and the block's linears are swapped to the chosen GEMM path. The sparse path compresses
each weight as it arrives and drops the dense copy, so the device never holds more than one dense layer beyond
what it serves. The mapping from format to modules is by sharing group (model.LINEAR_OF_GROUP), the same for
every family.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from esparse.errors import EsparseError
from esparse.format.ft_format import FTConfig, layer_prefix, linear_specs, param_counts, runtime_names
from esparse.format.ft_loader import FTFolder, LayerWeights
from esparse.format.nm_pack import PackedNM
from esparse.limits import check_fits

from .linear import SPARSE_BACKENDS, swap_linears
from .model import LINEAR_OF_GROUP, NORM_OF_GROUP, Transformer

log = logging.getLogger(__name__)


class WeightSource(Protocol):
    """What the loader reads: an exported folder (FTFolder) or a benchmark's random weights. A source may also
    have ``prepare_model(model)``, called on the declared (meta) model before any weight goes in: a
    tensor-parallel rank's source (python_api/distributed.py) swaps in its vocabulary-split head and the
    all-reduces there, so every builder (generate, bench, serve) gets the same sharded model."""

    cfg: FTConfig

    def model_tensors(self) -> dict[str, torch.Tensor]: ...

    def layer(self, i: int) -> LayerWeights: ...


def _on(w: torch.Tensor | PackedNM, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(w, PackedNM):
        w = w.to(device).to_dense()
    return w.to(device=device, dtype=dtype)


def block_state(cfg: FTConfig, lw: LayerWeights, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict of one TransformerBlock from a stored layer: linears stacked by group (gate and up become
    w1), biases likewise, norm gains gathered at their group's permutation."""
    fam = cfg.family
    state: dict[str, torch.Tensor] = {}
    by_group: dict[str, list] = {}
    for spec in linear_specs(cfg, lw.index):
        by_group.setdefault(spec.group, []).append(spec)
    for group, specs in by_group.items():
        mod = LINEAR_OF_GROUP[group]
        parts = [_on(lw.linears[s.name], device, dtype) for s in specs]
        state[f"{mod}.weight"] = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        if specs[0].bias:
            state[f"{mod}.bias"] = torch.cat([_on(lw.biases[s.bias_name], device, dtype) for s in specs], 0)
    prefix = layer_prefix(lw.index)
    for group, norm in NORM_OF_GROUP.items():
        stem = prefix + fam.group_norm[group]
        perm = lw.perms.get(group)
        for what in ("weight", "bias"):
            t = lw.tensors.get(f"{stem}.{what}")
            if t is not None:
                t = _on(t, device, dtype)
                state[f"{norm}.{what}"] = t if perm is None else t[perm.to(device)]
        if perm is not None:
            state[f"{norm}.perm"] = perm.to(device)
    return state


def model_state(cfg: FTConfig, tensors: dict[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
    """The state outside the blocks: embeddings, final norm, output projection."""
    return {mod: _on(tensors[ft], device, dtype) for ft, mod in runtime_names(cfg).items()}


def runtime_weight_bytes(cfg: FTConfig, dtype: torch.dtype, backend: str) -> int:
    """Device bytes of the filled model: dense linears, or compressed ones on the sparse path (N/M of the values
    plus their metadata, about 9/16 for 2:4)."""
    linears, other = param_counts(cfg)
    item = torch.tensor([], dtype=dtype).element_size()
    return int((linears * (0.5625 if backend in SPARSE_BACKENDS else 1.0) + other) * item)


def declare_variant(block: nn.Module, cfg: FTConfig) -> None:
    """What a block computes beyond its family's fixed shape, from config.ini: the biases of the groups the
    config names (LLaMA attention_bias / mlp_bias) and the MLP activation."""
    for group in cfg.bias_groups:
        lin = block.get_submodule(LINEAR_OF_GROUP[group])
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.empty(lin.out_features, device="meta"), requires_grad=False)
    block.feed_forward.act = cfg.activation


def build_decoder(src: WeightSource, device: torch.device | str, dtype: torch.dtype, backend: str) -> Transformer:
    """Declare, fill layer by layer, swap: the one way a Transformer gets its weights."""
    device = torch.device(device)
    cfg = src.cfg
    check_fits(runtime_weight_bytes(cfg, dtype, backend), device, f"the {cfg.n_layers}-layer model's weights",
               "use a smaller model, fewer layers or another device")
    with torch.device("meta"):
        model = Transformer(cfg)
    prepare = getattr(src, "prepare_model", None)
    if prepare is not None:
        prepare(model)
    missing = model.load_state_dict(model_state(cfg, src.model_tensors(), device, dtype), strict=False,
                                    assign=True).missing_keys
    outside = sorted(k for k in missing if not k.startswith("layers."))
    if outside:
        raise EsparseError(f"the weights miss {outside[0]}: re-run esparse export")
    for i, block in enumerate(model.layers):
        declare_variant(block, cfg)
        block.load_state_dict(block_state(cfg, src.layer(i), device, dtype), assign=True)
        swap_linears(block, backend)
        ff = block.feed_forward
        if ff.relu_fused and ff.act != "relu":  # the GEMM epilogue fuses a ReLU only: this activation runs in torch
            ff.w1.relu = ff.relu_fused = False
    model.requires_grad_(False)
    model.backend = backend
    model.setup_rope()
    return model.eval()


def default_backend(device: torch.device, sparse: bool) -> str:
    """dense: torch's F.linear (cuBLAS; what the compiled step fuses around). sparse: cuSPARSELt through the
    plugin where it is built (the path measured on the GPU so far), else our 2:4 decode kernel (Triton); the
    kernel becomes the default once its GPU measurements land (docs/gpu_path.md)."""
    if device.type != "cuda":
        if sparse:
            raise EsparseError("the sparse path needs a CUDA GPU; use --dense on the CPU")
        return "torch"
    if not sparse:
        return "torch"
    from esparse.ft_plugin import build_info, nm24

    info = build_info()
    if info.built:
        return "cusparselt"
    if nm24.available():
        return "sparse"
    raise EsparseError(f"the sparse path needs the compiled ft_plugin ({info.reason}) or Triton (a CUDA build of "
                       "torch); use --dense")


def load_decoder(path: str | Path, device: str = "cuda", dtype: torch.dtype = torch.float16, sparse: bool = False,
                 backend: str | None = None, tp: int | None = None) -> Transformer:
    """Load an exported folder onto one device. ``sparse`` puts every 2:4 linear on cuSPARSELt."""
    src = FTFolder(Path(path), tp)
    dev = torch.device(device)
    if src.cfg.tp != 1:
        log.info("merging %d tensor-parallel shards for one device", src.cfg.tp)
    if sparse and src.cfg.nm != (2, 4):
        raise EsparseError(f"{path} is {src.cfg.sparsity or 'dense'}: the sparse path serves 2:4 models; use --dense")
    be = backend or default_backend(dev, sparse)
    model = build_decoder(src, dev, dtype, be)
    log.info("loaded %s (%s, %d layers) on %s with %s linears", path, src.cfg.arch, src.cfg.n_layers, dev, be)
    return model
