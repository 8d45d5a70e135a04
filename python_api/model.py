"""The decoder (LLaMA and OPT), in one file, with the names of the papers (as gpt-fast writes it).

``Transformer`` declares its modules from an :class:`FTConfig` alone (on the meta device, no memory):
token (and, for OPT, learned position) embeddings, ``layers`` of :class:`TransformerBlock` (attention_norm ->
attention [wqkv, wo] -> ffn_norm -> feed_forward [w1, w2]), a final ``norm`` and the ``output`` projection.
The family description (esparse.format.families) says which norm, which positions and which MLP. Weights are
put in by the loader (python_api/loader.py), and the sparse or plugin-dense path then swaps the blocks' linears
(python_api/linear.py); this file knows nothing of files or GEMM backends.

Channel permutations cost nothing extra: producers' rows were permuted at export, and a norm that feeds a
permuted group gathers its input at P (norm statistics are permutation invariant), its gain gathered at load.

KV cache: preallocated [layers, batch, max_len, kv_heads, head_dim]; each row of the batch is a sequence with its
own length, so a batch can hold sequences that started at different times (continuous batching). ``start`` [B]
says where each row's new tokens go; a token's position is its cache slot.

Decode (one new token per row) is the hot path: on a GPU its step is compiled (torch.compile fuses the norms,
residual adds, rotary and cache writes, SiLU·up) and replayed from a CUDA graph per batch bucket
(:class:`GraphDecodeStep`); attention reads only each row's filled slots (python_api/attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esparse.errors import EsparseError
from esparse.format.families import ACTIVATIONS, rope_inv_freq
from esparse.format.ft_format import FTConfig

from .attention import decode_attention
from .timing import capture_graph

# Where each sharing group's linear and norm sit inside a TransformerBlock: the loader fills them by group, so
# this table is the whole mapping from the FT format to the modules, for every family.
LINEAR_OF_GROUP = {"attn_in": "attention.wqkv", "attn_out": "attention.wo", "mlp_in": "feed_forward.w1",
                   "mlp_out": "feed_forward.w2"}
NORM_OF_GROUP = {"attn_in": "attention_norm", "mlp_in": "ffn_norm"}


@dataclass
class KVCache:
    k: torch.Tensor  # [L, B, S, n_kv, d]
    v: torch.Tensor

    @classmethod
    def empty(cls, cfg: FTConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def rows(self, lo: int, hi: int) -> KVCache:
        """Rows lo..hi-1 as a cache of their own (views: writes land in this cache), e.g. to prefill one row."""
        return KVCache(self.k[:, lo:hi], self.v[:, lo:hi])


class Norm(nn.Module):
    """RMSNorm (LLaMA) or LayerNorm (OPT); ``permuted``: its output is gathered at the group's permutation."""

    def __init__(self, dim: int, eps: float, rms: bool, permuted: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.bias = None if rms else nn.Parameter(torch.empty(dim), requires_grad=False)
        self.register_buffer("perm", torch.empty(dim, dtype=torch.long) if permuted else None)
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


class Attention(nn.Module):
    """Multi-head attention with grouped-query key/value heads: wqkv [q | k | v] in one GEMM, then wo."""

    def __init__(self, cfg: FTConfig, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv, cfg.head_dim
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden, q + 2 * kv, bias=qkv_bias)
        self.wo = nn.Linear(q, cfg.hidden, bias=o_bias)

    def forward(self, x, rope, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, prefill: bool):
        """x [B, T, dim] at positions pos [B, T]; k_cache/v_cache [B, S, n_kv, d] of this layer. ``prefill``: the
        rows start empty (pos = 0..T-1), so attention is causal over the new tokens alone."""
        b, t, _ = x.shape
        d, nh, nkv = self.head_dim, self.n_head, self.n_kv
        q, k, v = self.wqkv(x).split([nh * d, nkv * d, nkv * d], dim=-1)
        q, k, v = q.view(b, t, nh, d), k.view(b, t, nkv, d), v.view(b, t, nkv, d)
        if rope is not None:
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        rows = torch.arange(b, device=x.device)[:, None]
        k_cache[rows, pos] = k
        v_cache[rows, pos] = v
        if t == 1:  # decode: one query per row over that row's filled slots
            y = decode_attention(q[:, 0], k_cache, v_cache, pos[:, 0] + 1)[:, None]
        elif prefill:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=nkv != nh).transpose(1, 2)
        else:  # new tokens after cached ones (chunked prefill): each sees the slots up to its own position
            mask = torch.arange(k_cache.shape[1], device=x.device)[None, None, :] <= pos[:, :, None]
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                               attn_mask=mask[:, None], enable_gqa=nkv != nh).transpose(1, 2)
        return self.wo(y.reshape(b, t, nh * d))


class FeedForward(nn.Module):
    """Gated (w2(act(x W_gate) * x W_up), gate and up stacked in w1: one GEMM; SwiGLU for LLaMA) or plain
    (w2(act(x w1)); ReLU for OPT). ``act`` is the config's activation (families.ACTIVATIONS), set by the loader."""

    def __init__(self, dim: int, hidden_dim: int, gated: bool, w1_bias: bool, w2_bias: bool):
        super().__init__()
        self.gated = gated
        self.act = "silu" if gated else "relu"
        self.w1 = nn.Linear(dim, 2 * hidden_dim if gated else hidden_dim, bias=w1_bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=w2_bias)
        self.relu_fused = False  # set when a swapped-in w1 applies the ReLU in its GEMM epilogue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = ACTIVATIONS[self.act](gate) * up
        elif not self.relu_fused:
            h = ACTIVATIONS[self.act](h)
        return self.w2(h)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: FTConfig):
        super().__init__()
        fam = cfg.family
        bias = {f.group: f.bias for f in fam.ft_linears}
        self.attention_norm = Norm(cfg.hidden, cfg.eps, fam.rms_norm, "attn_in" in cfg.permuted)
        self.attention = Attention(cfg, bias["attn_in"], bias["attn_out"])
        self.ffn_norm = Norm(cfg.hidden, cfg.eps, fam.rms_norm, "mlp_in" in cfg.permuted)
        self.feed_forward = FeedForward(cfg.hidden, cfg.inter, fam.gated_mlp, bias["mlp_in"], bias["mlp_out"])

    def forward(self, x, rope, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, prefill: bool):
        h = x + self.attention(self.attention_norm(x), rope, k_cache, v_cache, pos, prefill)
        return h + self.feed_forward(self.ffn_norm(h))


def _run_block(layer: TransformerBlock, x, rope, k_cache, v_cache, pos, prefill: bool) -> torch.Tensor:
    return layer(x, rope, k_cache, v_cache, pos, prefill)


class Transformer(nn.Module):
    """A LLaMA/OPT decoder: declared from the config, filled by the loader, linears swapped by the backend."""

    def __init__(self, cfg: FTConfig):
        super().__init__()
        self.cfg = cfg
        self.family = fam = cfg.family
        self.tok_embeddings = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos_embeddings = None if fam.rotary else nn.Embedding(cfg.max_pos, cfg.hidden)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = Norm(cfg.hidden, cfg.eps, fam.rms_norm)
        self.output = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.register_buffer("inv_freq", None, persistent=False)
        self.backend = "torch"
        self._graphs: dict[tuple[int, int], tuple[KVCache, GraphDecodeStep]] = {}
        self._decode_fn = None  # the compiled decode step (compile_decode), else the eager layers

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def setup_rope(self) -> None:
        """The rotary frequencies (rope scaling included), on the weights' device (called once the weights are in)."""
        if self.family.rotary:
            self.inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling, self.device)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.cfg.max_pos:
            raise EsparseError(f"{max_len} tokens exceed the model's {self.cfg.max_pos} positions")
        return KVCache.empty(self.cfg, batch, max_len, self.device, self.dtype)

    def graph_step(self, batch: int, max_len: int) -> tuple[KVCache, GraphDecodeStep]:
        """A decode step captured in a CUDA graph for ``batch`` sequences, with its own cache of at least
        ``max_len`` slots (rounded up to 256 so later calls reuse it)."""
        max_len = max(max_len, min(self.cfg.max_pos, -(-max_len // 256) * 256))
        key = (batch, max_len)
        if key not in self._graphs:
            cache = self.new_cache(batch, max_len)
            self._graphs[key] = (cache, GraphDecodeStep(self, cache))
        return self._graphs[key]

    def _rope(self, pos: torch.Tensor):
        if self.inv_freq is None:
            return None
        freqs = pos[..., None].float() * self.inv_freq  # [B, T, d/2]
        emb = torch.cat([freqs, freqs], -1)[:, :, None]  # [B, T, 1, d]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(self, ids: torch.Tensor, cache: KVCache, start: int | torch.Tensor,
                all_logits: bool = False) -> torch.Tensor:
        """Run tokens ``ids`` [B, T] written at cache slots start..start+T-1 of each row; returns logits
        [B, T or 1, vocab] (fp32).

        ``start``: an int (every row; 0 is a prefill of empty rows) or a [B] (or [1]) device tensor, one start
        per row (decode, CUDA-graph friendly: no host value steers the work).
        """
        b, t = ids.shape
        prefill = isinstance(start, int) and start == 0
        if isinstance(start, int):
            start = torch.full((b,), start, dtype=torch.long, device=ids.device)
        pos = start.expand(b)[:, None] + torch.arange(t, device=ids.device)  # [B, T]
        step = self._decode_fn if t == 1 and not prefill and self._decode_fn is not None else self._layers
        x = step(ids, pos, cache.k, cache.v, prefill)
        if not all_logits:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()

    def _layers(self, ids, pos, k_cache, v_cache, prefill: bool, block=None) -> torch.Tensor:
        x = self.tok_embeddings(ids)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(pos)
        rope = self._rope(pos)
        for i, layer in enumerate(self.layers):
            x = (block or _run_block)(layer, x, rope, k_cache[i], v_cache[i], pos, prefill)
        return x

    def compile_decode(self, enable: bool = True) -> None:
        """Compile the decode step (one token per row) with torch.compile: the norms, residual adds, rotary,
        cache writes and SiLU·up become a few fused kernels around the GEMMs. Off: the eager step."""
        if not enable:
            self._decode_fn = None
            return
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if self.tok_embeddings.weight.is_cuda:  # our Triton ops are registered before tracing (dynamo skips that)
            from esparse.python_api import attention

            attention._ops()
        block = torch.compile(_run_block, fullgraph=True, dynamic=False)  # one graph serves every layer
        self._decode_fn = lambda *a: self._layers(*a, block=block)

    def weight_bytes(self) -> int:
        """Bytes of all weights as held on the device (compressed sparse weights count compressed, once)."""
        total = 0
        for mod in self.modules():
            own = [*mod.parameters(recurse=False), *(b for b in mod.buffers(recurse=False) if b.is_floating_point())]
            if hasattr(mod, "compressed_bytes"):
                own = [t for t in own if t is not getattr(mod, "values", None)]
                total += mod.compressed_bytes()
            total += sum(t.numel() * t.element_size() for t in own)
        return total


class GraphDecodeStep:
    """One decode step captured in a CUDA graph for a fixed batch size and cache (the compiled step, when
    :meth:`Transformer.compile_decode` was called, is what gets captured)."""

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        b = cache.batch
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=model.device)
        self.start = torch.zeros(b, dtype=torch.long, device=model.device)
        self.graph, self.logits = capture_graph(lambda: model(self.ids, cache, self.start), model.device, warmup=2)

    def __call__(self, ids: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, 1, V] for ``ids`` [B, 1] written at ``start`` (an int for every row, or [B])."""
        self.ids.copy_(ids)
        if isinstance(start, int):
            self.start.fill_(start)
        else:
            self.start.copy_(start)
        self.graph.replay()
        return self.logits
