"""Attention of one new token per sequence over its filled part of the KV cache (the decode step).

Why a kernel: at decode each sequence has one query per head and its own number of cached keys (sequences of a
batch started at different times). SDPA with a mask over the whole cache reads every slot and pays for a mask;
this reads only the filled slots. Split-K over the keys ("flash-decoding"): grid (batch, kv head, split), each
program runs an online softmax over its chunk of keys for all the query heads that share its kv head (GQA), and
a second small kernel merges the splits' (max, sum, partial output). On the CPU (and as the tests' reference)
the same thing is SDPA with a length mask.

Cache layout: [batch, slots, kv_heads, head_dim] per layer, so that one token's keys are one contiguous row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only machines
    triton = None


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """q [B, H, D]; k, v [B, S, Hkv, D]; lengths [B] (keys 0..len-1 are valid) -> [B, H, D]."""
    b, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    mask = torch.arange(s, device=q.device)[None, :] < lengths[:, None]  # [B, S]
    y = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask[:, None, None, :], enable_gqa=hkv != h)
    return y[:, :, 0]


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, po_ptr, pml_ptr, scale, chunk,
                      sqb, sqh, skb, sks, skh, svb, svs, svh, H: tl.constexpr, G: tl.constexpr,
                      GP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.program_id(0)
        hk = tl.program_id(1)
        sp = tl.program_id(2)
        length = tl.load(len_ptr + b)
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, length)
        g = tl.arange(0, GP)
        dd = tl.arange(0, D)
        heads = hk * G + g
        q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + dd[None, :], mask=(g < G)[:, None], other=0.0)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        for s0 in range(lo, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < hi
            kt = tl.load(k_ptr + b * skb + s[None, :] * sks + hk * skh + dd[:, None], mask=ok[None, :], other=0.0)
            qk = tl.dot(q, kt) * scale.to(tl.float32)  # [GP, BLOCK_S], log2 units (inductor passes fp64)
            qk = tl.where(ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            vv = tl.load(v_ptr + b * svb + s[:, None] * svs + hk * svh + dd[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        row = (b * H + heads) * SPLITS + sp
        tl.store(po_ptr + row[:, None] * D + dd[None, :], acc, mask=(g < G)[:, None])
        tl.store(pml_ptr + row * 2, m_i, mask=g < G)
        tl.store(pml_ptr + row * 2 + 1, l_i, mask=g < G)

    @triton.jit
    def _merge_kernel(po_ptr, pml_ptr, o_ptr, SPLITS: tl.constexpr, SP: tl.constexpr, D: tl.constexpr):
        bh = tl.program_id(0)
        sp = tl.arange(0, SP)
        dd = tl.arange(0, D)
        ok = sp < SPLITS
        m = tl.load(pml_ptr + (bh * SPLITS + sp) * 2, mask=ok, other=float("-inf"))
        l_ = tl.load(pml_ptr + (bh * SPLITS + sp) * 2 + 1, mask=ok, other=0.0)
        o = tl.load(po_ptr + (bh * SPLITS + sp)[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)
        w = tl.exp2(m - tl.max(m, 0))
        w = tl.where(ok, w, 0.0)
        out = tl.sum(o * w[:, None], 0) / tl.sum(l_ * w, 0)
        tl.store(o_ptr + bh * D + dd, out.to(o_ptr.dtype.element_ty))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def splits_for(batch: int, kv_heads: int, slots: int, sms: int = 132) -> int:
    """Key splits per (sequence, kv head): enough programs to cover the SMs twice, chunks of at least 64 keys."""
    want = max(1, _cdiv(2 * sms, batch * kv_heads))
    return max(1, min(want, slots // 64, 64))


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, wrap=lambda fn: fn):
    """Run the two kernels (``wrap`` is torch.library.wrap_triton inside the op, identity elsewhere)."""
    b, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    splits = splits_for(b, hkv, s)
    chunk = _cdiv(_cdiv(s, splits), 64) * 64  # keys per split, whole blocks
    po = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
    pml = torch.empty((b, h, splits, 2), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    scale = (1.0 / math.sqrt(d)) * 1.4426950408889634  # exp2 units
    wrap(_split_kernel)[(b, hkv, splits)](
        q, k, v, lengths, po, pml, scale, chunk, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), H=h, G=g, GP=max(16, triton.next_power_of_2(g)), D=d,
        SPLITS=splits, BLOCK_S=64, num_warps=4, num_stages=2)
    wrap(_merge_kernel)[(b * h,)](po, pml, out, SPLITS=splits, SP=max(2, triton.next_power_of_2(splits)), D=d,
                                  num_warps=1)
    return out


_OPS = None  # the registered ops; read as a plain global so torch.compile never traces the registration


def _ops():
    global _OPS
    if _OPS is None:
        _OPS = _register()
    return _OPS


def _register():
    from torch.library import triton_op, wrap_triton

    @triton_op("esparse::decode_attention", mutates_args=())
    def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return launch(q, k, v, lengths, wrap_triton)

    return decode_attention


def kernel_ok(q: torch.Tensor) -> bool:
    d = q.shape[-1]
    return triton is not None and q.is_cuda and d >= 16 and d & (d - 1) == 0


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """q [B, H, D] (one token per sequence), k/v [B, S, Hkv, D], lengths [B] -> [B, H, D]."""
    if not kernel_ok(q):
        return reference(q, k, v, lengths)
    return _ops()(q.contiguous(), k, v, lengths)
