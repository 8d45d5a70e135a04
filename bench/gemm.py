"""GEMM benchmark: cuBLAS dense vs esparse's cuSPARSELt 2:4 vs torch semi-structured, LLaMA/OPT linear shapes.

    python bench/gemm.py [--models llama-7b,llama-13b,opt-6.7b] [--ms 1,8,16,32,64,128,256,1024,4096]

Y[M, N] = X[M, K] W^T in fp16 on one GPU. Timing: CUDA events around each call, warm-up first (which also
runs our per-shape algorithm search or reads it from the cache file), median of --iters calls. Prints a
table, writes gemm.json and gemm.png (speedup over cuBLAS vs M) under --out.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from esparse.report import environment, format_table, write_json

SHAPES = {  # (name, N, K) per linear, gate/up fused as the runtime runs them
    "llama-7b": [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)],
    "llama-13b": [("qkv", 15360, 5120), ("o", 5120, 5120), ("gate_up", 27648, 5120), ("down", 5120, 13824)],
    "opt-6.7b": [("qkv", 12288, 4096), ("o", 4096, 4096), ("fc1", 16384, 4096), ("fc2", 4096, 16384)],
}


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)  # microseconds
    return statistics.median(times)


def bench_shape(ops, model: str, name: str, n: int, k: int, ms: list[int], iters: int, torch_sparse: bool):
    """All M for one (N, K): a random 2:4 fp16 weight, each GEMM path timed on the same inputs."""
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * k**-0.5
    keep = w.view(n, -1, 4).abs().topk(2, -1).indices
    w = (w.view(n, -1, 4) * torch.zeros_like(w.view(n, -1, 4)).scatter_(-1, keep, 1)).view(n, k)
    sw = ops.SparseWeight(w)
    ts = None
    if torch_sparse:
        try:
            from torch.sparse import to_sparse_semi_structured

            ts = to_sparse_semi_structured(w)
        except (RuntimeError, ImportError) as e:
            print(f"torch semi-structured unavailable for {model} {name}: {e}")
    out = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        rec = {"model": model, "linear": name, "m": m, "n": n, "k": k,
               "cublas_us": _time(lambda x=x: F.linear(x, w), iters),
               "cublaslt_us": _time(lambda x=x: ops.dense_linear(x, w), iters),
               "esparse_us": _time(lambda x=x: ops.sparse_linear(x, sw), iters)}
        if ts is not None:
            try:
                rec["torch_sparse_us"] = _time(lambda x=x: F.linear(x, ts), max(5, iters // 5))
            except RuntimeError as e:
                rec["torch_sparse_error"] = str(e)[:200]
        rec["speedup"] = rec["cublas_us"] / rec["esparse_us"]
        out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-7b,llama-13b,opt-6.7b")
    ap.add_argument("--ms", default="1,8,16,32,64,128,256,1024,4096")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-torch-sparse", action="store_true", help="skip torch's semi-structured row")
    ap.add_argument("--out", type=Path, default=Path("results/gemm"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gemm.py needs a CUDA GPU")
    from esparse.ft_plugin import ops

    ms = [int(m) for m in args.ms.split(",")]
    records = []
    for model in args.models.split(","):
        for name, n, k in SHAPES[model]:
            records += bench_shape(ops, model, name, n, k, ms, args.iters, not args.no_torch_sparse)
            torch.cuda.empty_cache()
    rows = [[r["model"], r["linear"], r["m"], r["n"], r["k"], r["cublas_us"], r["cublaslt_us"], r["esparse_us"],
             r.get("torch_sparse_us", float("nan")), r["speedup"]] for r in records]
    env = environment()
    print(f"fp16 GEMM on {env['device']}, torch {env['torch']}, median of {args.iters} (microseconds)")
    print(format_table(["model", "linear", "M", "N", "K", "cuBLAS", "cuBLASLt", "esparse 2:4", "torch 2:4",
                        "speedup"], rows))
    write_json(args.out / "gemm.json", {"env": env, "results": records})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for model in args.models.split(","):
        for name, _, _ in SHAPES[model]:
            pts = [r for r in records if r["model"] == model and r["linear"] == name]
            ax.plot([r["m"] for r in pts], [r["speedup"] for r in pts], marker="o", label=f"{model} {name}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(1 / 0.5625, color="gray", lw=0.8, ls="--", label="memory-bound ceiling 1.78x")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup over cuBLAS (esparse 2:4)")
    ax.set_title(f"cuSPARSELt 2:4 vs dense, fp16, {env['device']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out / "gemm.png", dpi=110)
    print(f"wrote {args.out}/gemm.json and gemm.png")


if __name__ == "__main__":
    main()
