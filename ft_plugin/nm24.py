"""Our 2:4 GEMM for decode: reads the exported compressed layout (values + 2-bit positions) once, on any
cuSPARSELt (or none).

Why a kernel of our own: at decode (M = 1..64 tokens) a linear is bound by the bytes of its weight, and a 2:4
fp16 weight in the compressed layout is 0.5625x the dense bytes. cuSPARSELt reached 59% of the HBM read
bandwidth at M = 1 on the H200, and its tuned algorithms need a second library beside torch's. This kernel
streams the layout of docs/format.md directly: per output row, the kept values [K/2] and their in-group
positions, two bits each, LSB-first, which read as little-endian int32 words hold 16 positions (8 groups of 4
input channels) each. Each program expands a [BLOCK_N, BLOCK_K] tile of the weight to dense in registers (two
`where`s per group position) and multiplies it by the tokens' [BLOCK_K] slice: on CUDA cores for a few tokens
(a broadcast multiply and a row sum), on tensor cores (`tl.dot`) from BLOCK_M = 16 up. No metadata is
reshuffled and there is one compressed copy per weight: the same tensors the folder stores.

Larger M (prefill) is compute bound: there the weight is expanded into one shared scratch buffer by
:func:`decompress` and multiplied by cuBLAS (see python_api/linear.py), because expanding per tile would
redo the work for every block of tokens.

The ops are registered with ``torch.library.triton_op`` so that torch.compile traces them and CUDA graphs
capture them; every check happens once, when the weight is packed (:func:`pack_for_kernel`).
"""

from __future__ import annotations

import torch

from esparse.errors import EsparseError

try:  # Triton comes with CUDA builds of torch; CPU machines run the reference below instead
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

SMALL_M_MAX = 64  # at most this many tokens go through the kernel; more are expanded and run on cuBLAS


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def kernel_shape_ok(n: int, k: int) -> bool:
    """The kernel reads positions as int32 words of 32 input channels: K must be a multiple of 32."""
    return k % 32 == 0 and n > 0


def pack_for_kernel(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exported layout (values [N, K/2], uint8 meta [N, K/8]) as the kernel reads it: values contiguous and
    meta viewed as int32 words [N, K/32] (no copy of the bytes; little-endian order is the format's LSB-first)."""
    n, half = values.shape
    k = 2 * half
    if not kernel_shape_ok(n, k) or meta.shape != (n, k // 8) or meta.dtype != torch.uint8:
        raise EsparseError(f"2:4 layout [{n}, {k}] with metadata {tuple(meta.shape)} {meta.dtype}: the decode "
                           "kernel needs K a multiple of 32 and K/8 metadata bytes per row")
    return values.contiguous(), meta.contiguous().view(torch.int32)


def reference_linear(x: torch.Tensor, values: torch.Tensor, meta32: torch.Tensor, bias: torch.Tensor | None,
                     relu: bool) -> torch.Tensor:
    """What the kernel computes, in plain torch (fp32 accumulate): the CPU path and the tests' reference."""
    w = expand_reference(values, meta32)
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    if relu:
        y = y.clamp_min(0)
    return y.to(x.dtype)


def expand_reference(values: torch.Tensor, meta32: torch.Tensor) -> torch.Tensor:
    """Dense [N, K] from the kernel's view of the layout, in plain torch."""
    n, half = values.shape
    words = meta32.to(torch.int64) & 0xFFFFFFFF
    shifts = 2 * torch.arange(16, device=values.device)
    pos = ((words[:, :, None] >> shifts) & 3).reshape(n, half)  # entry e's position in its group
    dense = torch.zeros(n, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(2, pos.reshape(n, half // 2, 2), values.reshape(n, half // 2, 2))
    return dense.reshape(n, 2 * half)


if triton is not None:

    @triton.jit
    def _expand_tile(v_ptr, m_ptr, rn, kk, N, KH, KW, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """The dense [BLOCK_N, BLOCK_K] tile of rows rn at input channels kk..kk+BLOCK_K (zeros past N, K).
        Values and position words are read as contiguous row pieces (wide loads); the split into groups happens
        in registers."""
        G: tl.constexpr = BLOCK_K // 4
        row_ok = rn[:, None] < N
        vk = kk // 2 + tl.arange(0, BLOCK_K // 2)
        v_mask = row_ok
        if not EVEN_K:
            v_mask = row_ok & (vk[None, :] < KH)
        v = tl.load(v_ptr + rn[:, None] * KH + vk[None, :], mask=v_mask, other=0.0)
        v0, v1 = tl.split(tl.reshape(v, (v.shape[0], G, 2)))  # group g's kept values: entries 2g, 2g+1
        wk = kk // 32 + tl.arange(0, BLOCK_K // 32)
        w_mask = row_ok
        if not EVEN_K:
            w_mask = row_ok & (wk[None, :] < KW)
        words = tl.load(m_ptr + rn[:, None] * KW + wk[None, :], mask=w_mask, other=0)
        # group g's four position bits are nibble g % 8 of word g // 8
        nib = tl.reshape((words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 0xF, (v.shape[0], G))
        p0 = nib & 3
        p1 = nib >> 2
        zero = tl.zeros_like(v0)
        w0 = tl.where(p0 == 0, v0, zero)
        w1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
        w2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
        w3 = tl.where(p1 == 3, v1, zero)
        # interleave to [BLOCK_N, G, 4] -> [BLOCK_N, BLOCK_K]: join(join(w0, w2), join(w1, w3))[..., i, j] = w_{2i+j}
        w = tl.join(tl.join(w0, w2), tl.join(w1, w3))
        return tl.reshape(w, (w.shape[0], BLOCK_K))

    @triton.jit
    def _nm24_gemv_kernel(x_ptr, v_ptr, m_ptr, b_ptr, y_ptr, M, N, K, KH, KW, stride_xm, stride_ym,
                          HAS_BIAS: tl.constexpr, RELU: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """y[:M, rows] for a few tokens on CUDA cores: each weight tile is expanded once and used by every token."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rm = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, K, BLOCK_K):
            w = _expand_tile(v_ptr, m_ptr, rn, kk, N, KH, KW, BLOCK_K, EVEN_K).to(tl.float32)
            for mi in tl.static_range(BLOCK_M):
                x_mask = (kk + rk < K) & (mi < M)
                if EVEN_K:
                    x_mask = (rk >= 0) & (mi < M)
                xr = tl.load(x_ptr + mi * stride_xm + kk + rk, mask=x_mask, other=0.0)
                s = tl.sum(w * xr.to(tl.float32)[None, :], axis=1)
                acc += tl.where(rm[:, None] == mi, s[None, :], 0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _nm24_mma_kernel(x_ptr, v_ptr, m_ptr, b_ptr, y_ptr, M, N, K, KH, KW, stride_xm, stride_ym,
                         HAS_BIAS: tl.constexpr, RELU: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """y[rows_m, rows_n] on tensor cores: the expanded tile times the tokens' tile (tl.dot)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for kk in range(0, K, BLOCK_K):
            w = _expand_tile(v_ptr, m_ptr, rn, kk, N, KH, KW, BLOCK_K, EVEN_K)
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + (kk + rk)[:, None],
                         mask=(rm[None, :] < M) & ((kk + rk)[:, None] < K), other=0.0)
            acc = tl.dot(w, xt, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None]
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[None, :] < M) & (rn[:, None] < N))

    @triton.jit
    def _nm24_expand_kernel(v_ptr, m_ptr, w_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Dense W [N, K] from the layout (prefill: expanded once into scratch, then one cuBLAS GEMM)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.program_id(1) * BLOCK_K
        w = _expand_tile(v_ptr, m_ptr, rn, kk, N, K // 2, K // 32, BLOCK_K, False)
        rk = kk + tl.arange(0, BLOCK_K)
        tl.store(w_ptr + rn[:, None] * K + rk[None, :], w, mask=(rn[:, None] < N) & (rk[None, :] < K))


def _bucket(m: int) -> int:
    """Power-of-two token buckets; the kernel's BLOCK_M and the tile table are chosen per bucket."""
    return 1 << max(0, (m - 1).bit_length())


# (BLOCK_N, BLOCK_K, num_warps, num_stages) per M bucket: starting points, not yet measured on a GPU;
# set_tiles() overrides one (N, K, bucket) (bench/gemm.py --sweep times the candidates).
_DEFAULT_TILES = {1: (8, 512, 4, 3), 2: (8, 512, 4, 3), 4: (8, 256, 4, 3), 8: (16, 256, 4, 3),
                  16: (32, 128, 4, 4), 32: (32, 128, 4, 4), 64: (64, 128, 4, 4)}
_TILES: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}


def tiles(n: int, k: int, m: int) -> tuple[int, int, int, int]:
    b = min(_bucket(m), SMALL_M_MAX)
    return _TILES.get((n, k, b), _DEFAULT_TILES[b])


def set_tiles(n: int, k: int, bucket: int, cfg: tuple[int, int, int, int]) -> None:
    _TILES[(n, k, bucket)] = cfg


def _launch(x2: torch.Tensor, values: torch.Tensor, meta32: torch.Tensor, bias: torch.Tensor | None,
            relu: bool, y: torch.Tensor, wrap=lambda fn: fn) -> None:
    """y [M, N] = x2 [M, K] W^T (+ bias, ReLU); ``wrap`` is torch.library.wrap_triton inside the op."""
    m, k = x2.shape
    n = values.shape[0]
    bn, bk, warps, stages = tiles(n, k, m)
    bm = min(_bucket(m), 64)
    kernel = _nm24_gemv_kernel if bm < 16 else _nm24_mma_kernel
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    wrap(kernel)[grid](x2, values, meta32, bias if bias is not None else values, y, m, n, k, k // 2, k // 32,
                       x2.stride(0), y.stride(0), HAS_BIAS=bias is not None, RELU=relu, BLOCK_M=bm, BLOCK_N=bn,
                       BLOCK_K=bk, EVEN_K=k % bk == 0, num_warps=warps, num_stages=stages)


_OPS = None  # the registered ops; read as a plain global so torch.compile never traces the registration


def _ops():
    global _OPS
    if _OPS is None:
        _OPS = _register()
    return _OPS


def _register():
    """Register the ops once (torch.library.triton_op: traced by torch.compile, captured by CUDA graphs)."""
    from torch.library import triton_op, wrap_triton

    @triton_op("esparse::nm24_linear", mutates_args=())
    def nm24_linear(x: torch.Tensor, values: torch.Tensor, meta32: torch.Tensor, bias: torch.Tensor | None,
                    relu: bool) -> torch.Tensor:
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = torch.empty((x2.shape[0], values.shape[0]), dtype=x.dtype, device=x.device)
        _launch(x2, values, meta32, bias, relu, y, wrap_triton)
        return y.view(*x.shape[:-1], values.shape[0])

    @triton_op("esparse::nm24_expand", mutates_args=("out",))
    def nm24_expand(values: torch.Tensor, meta32: torch.Tensor, out: torch.Tensor) -> None:
        n, k = out.shape
        wrap_triton(_nm24_expand_kernel)[(triton.cdiv(n, 32), triton.cdiv(k, 128))](
            values, meta32, out, n, k, BLOCK_N=32, BLOCK_K=128, num_warps=4)

    return nm24_linear, nm24_expand


def linear(x: torch.Tensor, values: torch.Tensor, meta32: torch.Tensor, bias: torch.Tensor | None = None,
           relu: bool = False) -> torch.Tensor:
    """x W^T (+ bias, ReLU) for at most SMALL_M_MAX tokens, W in the compressed 2:4 layout."""
    if not available() or not x.is_cuda:
        return reference_linear(x, values, meta32, bias, relu)
    return _ops()[0](x, values, meta32, bias, relu)


def decompress(values: torch.Tensor, meta32: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write dense W into ``out`` [N, K] (a scratch buffer shared by every linear of the model)."""
    if not available() or not values.is_cuda:
        out.copy_(expand_reference(values, meta32))
        return out
    _ops()[1](values, meta32, out)
    return out
