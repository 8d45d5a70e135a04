"""GEMM benchmark: cuBLAS dense vs esparse's cuSPARSELt 2:4 vs torch semi-structured, LLaMA/OPT linear shapes.

    python bench/gemm.py [--models llama-7b,llama-13b,opt-6.7b] [--ms 1,8,16,32,64,128,256,1024,4096]

Y[M, N] = X[M, K] W^T in fp16 on one GPU, timed two ways after a warm-up (which also runs our per-shape
algorithm search or reads it from the cache file):
* single: CUDA events around one call, median of --iters calls (includes the launch and host overhead);
* graph (the decode-step way): --copies different weights of the shape (so the working set exceeds L2, as a
  model's layers do), each called in turn inside one CUDA graph, replayed; per-call time = replay / calls.
Prints a table, writes gemm.json and gemm.png (graph-mode speedup over cuBLAS vs M) under --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from esparse.python_api.bench import gemm_shapes, graph_seconds, median_seconds, random_24
from esparse.report import environment, format_table, new_figure, save_figure, write_json


def _time(fn, iters: int) -> float:
    """Median microseconds of one call (the shared timer, 3 warm-up calls)."""
    return 1e6 * median_seconds(fn, "cuda", iters, warmup=3)


def _graph_time(calls, iters: int) -> float:
    """Per-call microseconds of ``calls`` in one CUDA graph (the shared graph timer)."""
    return 1e6 * graph_seconds(calls, max(5, iters // 5))


def bench_shape(ops, model: str, name: str, n: int, k: int, ms: list[int], iters: int, torch_sparse: bool,
                copies: int = 8):
    """All M for one (N, K): random 2:4 fp16 weights, each GEMM path timed on the same inputs."""
    ws = [random_24(n, k, "cuda", seed=seed) for seed in range(copies)]
    sws = [ops.SparseWeight(w) for w in ws]
    w0, sw0 = ws[0], sws[0]
    ts = None
    if torch_sparse:
        try:
            from torch.sparse import to_sparse_semi_structured

            ts = to_sparse_semi_structured(w0)
        except (RuntimeError, ImportError) as e:
            print(f"torch semi-structured unavailable for {model} {name}: {e}")
    out = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        rec = {"model": model, "linear": name, "m": m, "n": n, "k": k,
               "cublas_us": _time(lambda x=x: F.linear(x, w0), iters),
               "cublaslt_us": _time(lambda x=x: ops.dense_linear(x, w0), iters),
               "esparse_us": _time(lambda x=x: ops.sparse_linear(x, sw0), iters),
               "cublas_graph_us": _graph_time([lambda x=x, w=w: F.linear(x, w) for w in ws], iters),
               "cublaslt_graph_us": _graph_time([lambda x=x, w=w: ops.dense_linear(x, w) for w in ws], iters),
               "esparse_graph_us": _graph_time([lambda x=x, s=s: ops.sparse_linear(x, s) for s in sws], iters)}
        if ts is not None:
            try:
                rec["torch_sparse_us"] = _time(lambda x=x: F.linear(x, ts), max(5, iters // 5))
            except RuntimeError as e:
                rec["torch_sparse_error"] = str(e)[:200]
        rec["speedup"] = rec["cublas_us"] / rec["esparse_us"]
        rec["speedup_graph"] = rec["cublas_graph_us"] / rec["esparse_graph_us"]
        out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-7b,llama-13b,opt-6.7b")
    ap.add_argument("--ms", default="1,8,16,32,64,128,256,1024,4096")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-torch-sparse", action="store_true", help="skip torch's semi-structured row")
    ap.add_argument("--copies", type=int, default=8, help="weights per shape in the graph timing (beyond L2)")
    ap.add_argument("--out", type=Path, default=Path("results/gemm"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gemm.py needs a CUDA GPU")
    from esparse.ft_plugin import ops

    ms = [int(m) for m in args.ms.split(",")]
    records = []
    for model in args.models.split(","):
        for name, n, k in gemm_shapes(model):
            records += bench_shape(ops, model, name, n, k, ms, args.iters, not args.no_torch_sparse, args.copies)
            torch.cuda.empty_cache()
    rows = [[r["model"], r["linear"], r["m"], r["n"], r["k"], r["cublas_us"], r["esparse_us"], r["speedup"],
             r["cublas_graph_us"], r["cublaslt_graph_us"], r["esparse_graph_us"], r["speedup_graph"],
             r.get("torch_sparse_us", float("nan"))] for r in records]
    env = environment()
    env["cusparselt"] = ops.CUSPARSELT.summary
    print(f"fp16 GEMM on {env['device']}, torch {env['torch']}, cuSPARSELt {env['cusparselt']}; microseconds: "
          f"single = median of {args.iters} calls, graph = per call of {args.copies} weights in one CUDA graph")
    print(format_table(["model", "linear", "M", "N", "K", "cuBLAS", "esparse", "x single", "cuBLAS g",
                        "cuBLASLt g", "esparse g", "x graph", "torch 2:4"], rows))
    write_json(args.out / "gemm.json", {"env": env, "results": records})
    fig, ax = new_figure(figsize=(8, 5))
    for model in args.models.split(","):
        for name, _, _ in gemm_shapes(model):
            pts = [r for r in records if r["model"] == model and r["linear"] == name]
            ax.plot([r["m"] for r in pts], [r["speedup_graph"] for r in pts], marker="o", label=f"{model} {name}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(1 / 0.5625, color="gray", lw=0.8, ls="--", label="memory-bound ceiling 1.78x")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup over cuBLAS, CUDA-graph timing (esparse 2:4)")
    ax.set_title(f"cuSPARSELt 2:4 vs dense, fp16, {env['device']}")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, args.out / "gemm.png")
    print(f"wrote {args.out}/gemm.json and gemm.png")


if __name__ == "__main__":
    main()
