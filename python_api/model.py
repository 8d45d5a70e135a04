"""The decoder runtime (LLaMA and OPT) over an exported FasterTransformer-layout folder.

Data flows one way: ``load_decoder`` reads and validates the folder (esparse.format.ft_loader), moves each
tensor once to the device, and builds a :class:`Decoder` whose linears are all on one GEMM path. Channel
permutations cost nothing extra: producers' rows were permuted at export, and each norm that feeds a
permuted group gathers its input at P (norm statistics are permutation invariant) with its gain gathered
once at load.

KV cache: preallocated [layers, batch, kv_heads, max_len, head_dim]. Prompts of different lengths are left
padded, so every sequence writes the same cache slot at each step; ``pad`` [B] says where each starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from esparse.errors import EsparseError
from esparse.format.families import family
from esparse.format.ft_format import FTConfig, linear_specs, perm_names
from esparse.format.ft_loader import FTWeights, load_ft

from .linear import make_linear

log = logging.getLogger(__name__)


@dataclass
class KVCache:
    k: torch.Tensor  # [L, B, n_kv, S, d]
    v: torch.Tensor
    pad: torch.Tensor  # [B] first valid slot of each sequence (left padding)

    @classmethod
    def empty(cls, cfg: FTConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (cfg.n_layers, batch, cfg.n_kv, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class Norm(nn.Module):
    """RMSNorm (LLaMA) or LayerNorm (OPT), optionally writing its output gathered at a permutation."""

    def __init__(self, weight, bias, eps: float, rms: bool, perm: torch.Tensor | None):
        super().__init__()
        if perm is not None:
            weight = weight[perm]
            bias = None if bias is None else bias[perm]
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("perm", perm)
        self.eps, self.rms = eps, rms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if not self.rms:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Layer(nn.Module):
    def __init__(self, cfg: FTConfig, w: FTWeights, i: int, backend: str, device, dtype):
        super().__init__()
        self.cfg = cfg
        fam = self.family = family(cfg.arch)
        rms = fam.rms_norm
        p = f"model.layers.{i}."
        pn = perm_names(cfg, i)
        t = lambda x: None if x is None else x.to(device=device, dtype=dtype)
        perm = lambda g: w.perms[pn[g]].to(device) if pn[g] in w.perms else None
        self.attn_norm = Norm(t(w.tensors[p + "input_layernorm.weight"]), t(w.tensors.get(p + "input_layernorm.bias")),
                              cfg.eps, rms, perm("attn_in"))
        self.mlp_norm = Norm(t(w.tensors[p + "post_attention_layernorm.weight"]),
                             t(w.tensors.get(p + "post_attention_layernorm.bias")), cfg.eps, rms, perm("mlp_in"))
        specs = {s.name.split(".", 3)[3]: s for s in linear_specs(cfg, i)}

        def lin(key: str, relu: bool = False, fuse_with: str | None = None):
            name = specs[key].name
            weight = w.dense(name)
            if fuse_with is not None:  # gate and up read one input: one GEMM of 2x the rows
                weight = torch.cat([weight, w.dense(specs[fuse_with].name)], 0)
            bname = specs[key].bias_name  # column-parallel biases are split per rank, row-parallel ones are whole
            bias = w.biases.get(bname) if specs[key].parallel == "col" else w.tensors.get(bname)
            return make_linear(t(weight), t(bias), backend, relu)

        self.qkv = lin("attention.query_key_value.weight")
        self.o = lin("attention.dense.weight")
        up = [f.stem + ".weight" for f in fam.ft_linears if f.group == "mlp_in"]
        down = fam.ft_linear("mlp_out", "row").stem + ".weight"
        if fam.gated_mlp:  # gate and up read one input: one GEMM of 2x the rows
            self.gate_up = lin(up[0], fuse_with=up[1])
            self.down = lin(down)
        else:
            self.fc1 = lin(up[0], relu=True)
            self.fc2 = lin(down)

    def forward(self, x, cos, sin, cache: KVCache, i: int, slot: torch.Tensor, mask, attend: int | None):
        cfg = self.cfg
        b, t, _ = x.shape
        d, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv
        qkv = self.qkv(self.attn_norm(x))
        q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
        q = q.view(b, t, nh, d).transpose(1, 2)
        k = k.view(b, t, nkv, d).transpose(1, 2)
        v = v.view(b, t, nkv, d).transpose(1, 2)
        if cos is not None:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        cache.k[i].index_copy_(2, slot, k)
        cache.v[i].index_copy_(2, slot, v)
        if mask is None:  # prefill without padding: causal attention over the new tokens only
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)
        else:
            kk, vv = cache.k[i], cache.v[i]
            if attend is not None:
                kk, vv = kk[:, :, :attend], vv[:, :, :attend]
            att = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=nkv != nh)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, nh * d))
        h = self.mlp_norm(x)
        if self.family.gated_mlp:
            gate, up = self.gate_up(h).chunk(2, dim=-1)
            return x + self.down(F.silu(gate) * up)
        return x + self.fc2(self.fc1(h))


class Decoder(nn.Module):
    """A LLaMA/OPT decoder over exported weights; ``backend`` is torch, dense (cuBLASLt) or sparse."""

    def __init__(self, w: FTWeights, device="cpu", dtype=torch.float16, backend: str = "torch"):
        super().__init__()
        cfg = self.cfg = w.cfg
        fam = self.family = family(cfg.arch)
        self.backend, self.device, self.dtype = backend, torch.device(device), dtype
        self._graphs: dict[tuple[int, int], tuple[KVCache, GraphDecodeStep]] = {}
        t = lambda x: x.to(device=device, dtype=dtype)
        self.register_buffer("wte", t(w.tensors[fam.ft_embed]))
        self.register_buffer("wpe", None if fam.rotary else t(w.tensors["model.wpe"]))
        self.layers = nn.ModuleList(Layer(cfg, w, i, backend, device, dtype) for i in range(cfg.n_layers))
        self.final_norm = Norm(t(w.tensors["model.final_layernorm.weight"]),
                               None if fam.rms_norm else t(w.tensors["model.final_layernorm.bias"]),
                               cfg.eps, fam.rms_norm, None)
        self.register_buffer("lm_head", t(w.tensors["model.lm_head.weight"]))
        if fam.rotary:
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
            self.register_buffer("inv_freq", inv.to(device))

    def graph_step(self, batch: int, max_len: int) -> tuple[KVCache, GraphDecodeStep]:
        """A decode step captured in a CUDA graph for ``batch`` sequences, with its own cache of at least
        ``max_len`` slots (rounded up to 256 so later calls reuse it)."""
        max_len = max(max_len, min(self.cfg.max_pos, -(-max_len // 256) * 256))
        key = (batch, max_len)
        if key not in self._graphs:
            cache = self.new_cache(batch, max_len)
            self._graphs[key] = (cache, GraphDecodeStep(self, cache))
        return self._graphs[key]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.cfg.max_pos:
            raise EsparseError(f"{max_len} tokens exceed the model's {self.cfg.max_pos} positions")
        return KVCache.empty(self.cfg, batch, max_len, self.device, self.dtype)

    def _rope(self, pos: torch.Tensor):
        if not self.family.rotary:
            return None, None
        freqs = pos[..., None].float() * self.inv_freq  # [B, T, d/2]
        emb = torch.cat([freqs, freqs], -1)[:, None]  # [B, 1, T, d]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(self, ids: torch.Tensor, cache: KVCache, start: int | torch.Tensor, all_logits: bool = False,
                attend: int | None = None) -> torch.Tensor:
        """Run tokens ``ids`` [B, T] written at cache slots start..start+T-1; returns logits.

        Prefill: start = 0 (int). Decode: T = 1 and ``start`` a 1-element device tensor (CUDA-graph friendly);
        ``attend`` limits attention to the first slots (eager decode), None attends to all (graphs).
        """
        b, t = ids.shape
        dev = ids.device
        if isinstance(start, int):
            slot = torch.arange(start, start + t, device=dev)
        else:
            slot = start + torch.arange(t, device=dev)
        pos = (slot[None, :] - cache.pad[:, None]).clamp_min(0)  # [B, T]
        x = F.embedding(ids, self.wte)
        if self.wpe is not None:
            x = x + F.embedding(pos, self.wpe)
        cos, sin = self._rope(pos)
        plain = t > 1 and isinstance(start, int) and start == 0 and not bool((cache.pad > 0).any())
        mask = None
        if not plain:
            s = attend if attend is not None else cache.max_len
            keys = torch.arange(s, device=dev)
            mask = (keys[None, None, :] <= slot[None, :, None]) & (keys[None, None, :] >= cache.pad[:, None, None])
            mask = mask | (keys[None, None, :] == slot[None, :, None])  # padded queries see themselves
            mask = mask[:, None]  # [B, 1, T, S]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, slot, mask, attend)
        if not all_logits:
            x = x[:, -1:]
        return F.linear(self.final_norm(x), self.lm_head).float()


class GraphDecodeStep:
    """One decode step captured in a CUDA graph for a fixed batch size and cache."""

    def __init__(self, model: Decoder, cache: KVCache):
        self.model, self.cache = model, cache
        b = cache.k.shape[1]
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=model.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=model.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (plans, workspaces, autotuning)
            for _ in range(2):
                model(self.ids, cache, self.slot)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.ids, cache, self.slot)

    def __call__(self, ids: torch.Tensor, slot: int) -> torch.Tensor:
        self.ids.copy_(ids)
        self.slot.fill_(slot)
        self.graph.replay()
        return self.logits


def default_backend(device: torch.device, sparse: bool) -> str:
    if device.type != "cuda":
        if sparse:
            raise EsparseError("the sparse path needs a CUDA GPU with sparse tensor cores; use --dense on the CPU")
        return "torch"
    from esparse.ft_plugin import build_info

    info = build_info()
    if not info.built:
        if sparse:
            raise EsparseError(f"the sparse path needs the compiled ft_plugin ({info.reason}); use --dense")
        log.warning("ft_plugin not built (%s): dense linears run on torch", info.reason)
        return "torch"
    return "sparse" if sparse else "dense"


def load_decoder(path: str | Path, device: str = "cuda", dtype: torch.dtype = torch.float16, sparse: bool = False,
                 backend: str | None = None, tp: int | None = None) -> Decoder:
    """Load an exported folder onto one device. ``sparse`` puts every 2:4 linear on cuSPARSELt."""
    w = load_ft(Path(path), tp)
    dev = torch.device(device)
    if w.cfg.tp != 1:
        log.info("reassembled %d tensor-parallel shards for one device", w.cfg.tp)
    if sparse and w.cfg.nm != (2, 4):
        raise EsparseError(f"{path} is {w.cfg.sparsity or 'dense'}: the sparse path serves 2:4 models; use --dense")
    be = backend or default_backend(dev, sparse)
    model = Decoder(w, dev, dtype, be)
    log.info("loaded %s (%s, %d layers) on %s with %s linears", path, w.cfg.arch, w.cfg.n_layers, dev, be)
    return model.eval()


def weight_bytes(model: Decoder) -> int:
    """Bytes of all weights as held on the device (compressed sparse weights count compressed)."""
    total = sum(b.numel() * b.element_size() for b in model.buffers() if b is not None and b.is_floating_point())
    for mod in model.modules():
        if hasattr(mod, "sparse"):
            total += mod.sparse.nbytes()
        elif hasattr(mod, "weight") and isinstance(mod.weight, torch.Tensor) and not isinstance(mod, Norm):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


