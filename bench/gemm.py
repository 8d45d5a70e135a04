"""GEMM benchmark: cuBLAS dense vs our 2:4 kernel vs cuSPARSELt 2:4 vs torch semi-structured, LLaMA/OPT shapes.

    python bench/gemm.py [--models llama-7b,llama-13b,opt-6.7b] [--ms 1,8,16,32,64,128,256,1024,4096]

Y[M, N] = X[M, K] W^T in fp16 on one GPU, timed two ways after a warm-up (which also runs our per-shape
algorithm search or reads it from the cache file):
* single: CUDA events around one call, median of --iters calls (includes the launch and host overhead);
* graph (the decode-step way): --copies different weights of the shape (so the working set exceeds L2, as a
  model's layers do), each called in turn inside one CUDA graph, replayed; per-call time = replay / calls.
"nm24" is our 2:4 kernel (ft_plugin/nm24.py: the exported layout read directly; expanded + cuBLAS past 64
tokens); its read bandwidth (compressed bytes per graph call / time) is printed beside the GPU's measured read
bandwidth. ``--sweep`` times every tile configuration of the kernel per shape and M and reports the best.
Prints a table, writes gemm.json and gemm.png (graph-mode speedup over cuBLAS vs M) under --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from esparse.format.shapes import gemm_shapes
from esparse.python_api.linear import NM24Linear
from esparse.python_api.random_weights import random_24
from esparse.python_api.timing import graph_seconds, median_seconds, read_bandwidth
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
    sws = [ops.SparseWeight(w) for w in ws] if ops is not None else []
    nms = [NM24Linear(w) for w in ws]
    w0 = ws[0]
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
               "cublas_graph_us": _graph_time([lambda x=x, w=w: F.linear(x, w) for w in ws], iters),
               "nm24_graph_us": _graph_time([lambda x=x, lin=lin: lin(x) for lin in nms], iters)}
        if ops is not None:  # the plugin's rows (cuBLASLt, cuSPARSELt) where it is built
            rec.update(cublaslt_us=_time(lambda x=x: ops.dense_linear(x, w0), iters),
                       esparse_us=_time(lambda x=x: ops.sparse_linear(x, sws[0]), iters),
                       cublaslt_graph_us=_graph_time([lambda x=x, w=w: ops.dense_linear(x, w) for w in ws], iters),
                       esparse_graph_us=_graph_time([lambda x=x, s=s: ops.sparse_linear(x, s) for s in sws], iters))
            rec["speedup"] = rec["cublas_us"] / rec["esparse_us"]
            rec["speedup_graph"] = rec["cublas_graph_us"] / rec["esparse_graph_us"]
        rec["nm24_GBps"] = (n * k * 1.125 + 2 * m * (k + n)) / rec["nm24_graph_us"] / 1e3
        rec["cublas_GBps"] = (n * k * 2 + 2 * m * (k + n)) / rec["cublas_graph_us"] / 1e3
        rec["speedup_nm24"] = rec["cublas_graph_us"] / rec["nm24_graph_us"]
        if ts is not None:
            try:
                rec["torch_sparse_us"] = _time(lambda x=x: F.linear(x, ts), max(5, iters // 5))
            except RuntimeError as e:
                rec["torch_sparse_error"] = str(e)[:200]
        out.append(rec)
    return out


def sweep(model: str, name: str, n: int, k: int, ms: list[int], copies: int) -> list[dict]:
    """Every tile configuration of the kernel for (N, K) at each M (graph timing); the best one is set for the
    rest of the run and reported."""
    from esparse.ft_plugin import nm24

    nms = [NM24Linear(random_24(n, k, "cuda", seed=seed)) for seed in range(copies)]
    out = []
    for m in ms:
        if m > nm24.SMALL_M_MAX:
            continue
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        b = min(nm24._bucket(m), nm24.SMALL_M_MAX)
        best = None
        for bn in (4, 8, 16) if b < 16 else (16, 32, 64):
            for bk in (256, 512, 1024) if b < 16 else (64, 128, 256):
                for warps in (4, 8):
                    for stages in (2, 4):
                        if bn * bk > 32768 or (b >= 16 and bn < 16):
                            continue
                        nm24.set_tiles(n, k, b, (bn, bk, warps, stages))
                        try:
                            us = _graph_time([lambda x=x, lin=lin: lin(x) for lin in nms], 10)
                        except Exception as e:  # a tile the compiler refuses (shared memory, registers)
                            print(f"tile {(bn, bk, warps, stages)}: {type(e).__name__}")
                            continue
                        if best is None or us < best[0]:
                            best = (us, (bn, bk, warps, stages))
        nm24.set_tiles(n, k, b, best[1])
        gbps = (n * k * 1.125 + 2 * m * (k + n)) / best[0] / 1e3
        out.append({"model": model, "linear": name, "m": m, "n": n, "k": k, "best_us": best[0], "tile": best[1],
                    "GBps": gbps})
        print(f"sweep {model} {name} M={m} N={n} K={k}: best {best[1]} {best[0]:.1f} us {gbps:.0f} GB/s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-7b,llama-13b,opt-6.7b")
    ap.add_argument("--ms", default="1,8,16,32,64,128,256,1024,4096")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-torch-sparse", action="store_true", help="skip torch's semi-structured row")
    ap.add_argument("--copies", type=int, default=8, help="weights per shape in the graph timing (beyond L2)")
    ap.add_argument("--out", type=Path, default=Path("results/gemm"))
    ap.add_argument("--sweep", default="", help="comma list of M to tune the kernel's tiles at first (e.g. 1,16)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gemm.py needs a CUDA GPU")
    from esparse.ft_plugin import build_info

    if build_info().built:
        from esparse.ft_plugin import ops
    else:  # our Triton kernel needs no plugin: time it against cuBLAS alone
        ops = None
        print(f"ft_plugin not built ({build_info().reason}): cuBLASLt and cuSPARSELt rows left out", flush=True)

    ms = [int(m) for m in args.ms.split(",")]
    bw = read_bandwidth("cuda")
    print(f"measured read bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    tiles = []
    if args.sweep:
        for model in args.models.split(","):
            for name, n, k in gemm_shapes(model):
                tiles += sweep(model, name, n, k, [int(m) for m in args.sweep.split(",")], args.copies)
    records = []
    for model in args.models.split(","):
        for name, n, k in gemm_shapes(model):
            records += bench_shape(ops, model, name, n, k, ms, args.iters, not args.no_torch_sparse, args.copies)
            torch.cuda.empty_cache()
    nan = float("nan")
    rows = [[r["model"], r["linear"], r["m"], r["n"], r["k"], r["cublas_graph_us"], r.get("cublaslt_graph_us", nan),
             r.get("esparse_graph_us", nan), r["nm24_graph_us"], r.get("speedup_graph", nan), r["speedup_nm24"],
             r["nm24_GBps"], r["cublas_GBps"]] for r in records]
    env = environment()
    env["cusparselt"] = ops.CUSPARSELT.summary if ops is not None else "plugin not built"
    env["read_bandwidth_GBps"] = bw / 1e9
    print(f"fp16 GEMM on {env['device']}, torch {env['torch']}, cuSPARSELt {env['cusparselt']}; microseconds: "
          f"single = median of {args.iters} calls, graph = per call of {args.copies} weights in one CUDA graph")
    print(format_table(["model", "linear", "M", "N", "K", "cuBLAS g", "cuBLASLt g", "cuSPARSELt g", "nm24 g",
                        "x cuSPARSELt", "x nm24", "nm24 GB/s", "cuBLAS GB/s"], rows))
    step = {}
    for model in args.models.split(","):
        for m in ms:
            per = [r for r in records if r["model"] == model and r["m"] == m]
            layers = {"llama-7b": 32, "llama-13b": 40, "opt-6.7b": 32}.get(model, 1)
            step[f"{model} M={m}"] = {key: layers * sum(r[key] for r in per) / 1e3
                                      for key in ("cublas_graph_us", "esparse_graph_us", "nm24_graph_us")
                                      if key in per[0]}
            print(f"{model} M={m}: linears of one step (ms) " + ", ".join(f"{k.split('_')[0]} {v:.3f}"
                                                                         for k, v in step[f"{model} M={m}"].items()))
    write_json(args.out / "gemm.json", {"env": env, "results": records, "tiles": tiles, "step_linears_ms": step})
    fig, ax = new_figure(figsize=(8, 5))
    for model in args.models.split(","):
        for name, _, _ in gemm_shapes(model):
            pts = [r for r in records if r["model"] == model and r["linear"] == name]
            ax.plot([r["m"] for r in pts], [r["speedup_nm24"] for r in pts], marker="o", label=f"{model} {name} nm24")
            if ops is not None:
                ax.plot([r["m"] for r in pts], [r["speedup_graph"] for r in pts], marker="x", ls=":",
                        label=f"{model} {name} cuSPARSELt")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(1 / 0.5625, color="gray", lw=0.8, ls="--", label="memory-bound ceiling 1.78x")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup over cuBLAS, CUDA-graph timing")
    ax.set_title(f"2:4 (nm24, cuSPARSELt) vs dense, fp16, {env['device']}")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, args.out / "gemm.png")
    print(f"wrote {args.out}/gemm.json and gemm.png")


if __name__ == "__main__":
    main()
