"""``esparse bench``: dense and sparse decoders side by side in one process.

Measures, per backend: prefill latency of one prompt of --prompt-len tokens, decode tokens/s at each batch
size (the decode step compiled with torch.compile unless --no-compile, replayed from CUDA graphs unless
--no-cuda-graph), and per batch the step's milliseconds, its GEMM floor (the same linears alone, back to back in
one CUDA graph), the rest (non-GEMM ms), kernels per step and the share of the memory roofline (weight bytes
over the read bandwidth measured in the same run); weight bytes on the device, the time to build the model and
to compile the first step, and GPU memory (torch's allocator) counted from what was allocated before the
backend was built: resident after loading, peak while loading, peak over the whole run. Prints a table with
each backend against the strongest dense (the faster of torch and dense), writes bench.json and bench.png.
Timing: CUDA events (perf_counter with a sync on the CPU), warm-up first, median of repeats.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch

from esparse.errors import EsparseError
from esparse.format.ft_loader import FTFolder
from esparse.report import environment, format_table, new_figure, save_figure, write_json

from .loader import WeightSource, build_decoder
from .model import GraphDecodeStep, Transformer
from .random_weights import RandomWeights
from .timing import graph_seconds, median_seconds, read_bandwidth, sync

log = logging.getLogger(__name__)


def _linears(model: Transformer) -> list[torch.nn.Module]:
    return [m for layer in model.layers for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w1,
                                                   layer.feed_forward.w2)]


def gemm_floor_s(model: Transformer, batch: int) -> float:
    """Seconds of the decode step's linears alone at ``batch`` tokens, back to back in one CUDA graph."""
    xs = {}
    calls = []
    for lin in _linears(model):
        k = lin.k if hasattr(lin, "k") else (lin.weight.shape[1] if hasattr(lin, "weight") else lin.sparse.k)
        if k not in xs:
            xs[k] = torch.randn(batch, k, device=model.device, dtype=model.dtype)
        calls.append(lambda lin=lin, x=xs[k]: lin(x))
    return graph_seconds(calls, 10) * len(calls)


def kernels_per_step(model: Transformer, batch: int, ctx: int) -> int:
    """GPU kernels one decode step launches (counted with the profiler on the step as it runs, not graphed)."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(batch, ctx + 2)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    start = torch.full((batch,), ctx, device=model.device)
    model(tok, cache, start)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(tok, cache, start)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _decode_tok_s(model: Transformer, batch: int, ctx: int, steps: int, graphs: bool) -> float:
    """Tokens/s of ``steps`` decode steps after a ``ctx``-token prompt, at one batch size."""
    dev, vocab = model.device, model.cfg.vocab
    cache = model.new_cache(batch, ctx + steps + 1)
    model(torch.randint(0, vocab, (batch, ctx), device=dev), cache, 0)
    tok = torch.randint(0, vocab, (batch, 1), device=dev)
    starts = [torch.full((batch,), ctx + j, device=dev) for j in range(steps)]
    if graphs and dev.type == "cuda":
        step = GraphDecodeStep(model, cache)
        run = lambda: [step(tok, starts[j]) for j in range(steps)]
    else:
        run = lambda: [model(tok, cache, starts[j]) for j in range(steps)]
    return batch * steps / median_seconds(run, dev, 3)


@torch.no_grad()
def measure(model: Transformer, prompt_len: int, batches: list[int], steps: int, graphs: bool,
            compiled: bool = True) -> dict:
    """Prefill and decode speed; bytes of the weights; the first prefill's seconds (plans, algorithm choice);
    on a GPU the decode step's anatomy (GEMM floor, the rest, kernels) per batch."""
    dev = model.device
    res: dict = {"weight_bytes": model.weight_bytes()}
    if compiled and dev.type == "cuda":
        model.compile_decode()
        cache = model.new_cache(batches[0], 8)
        t0 = time.perf_counter()
        model(torch.zeros(batches[0], 1, dtype=torch.long, device=dev), cache, torch.zeros(batches[0], device=dev,
                                                                                           dtype=torch.long))
        sync(dev)
        res["compile_s"] = time.perf_counter() - t0
    vocab = model.cfg.vocab
    ids = torch.randint(0, vocab, (1, prompt_len), device=dev)
    cache = model.new_cache(1, prompt_len)
    t0 = time.perf_counter()
    model(ids, cache, 0)
    sync(dev)
    res["first_prefill_s"] = time.perf_counter() - t0
    res["prefill_s"] = median_seconds(lambda: model(ids, cache, 0), dev, 5)
    ctx = max(1, min(128, model.cfg.max_pos - steps - 1))  # decode after a short prompt
    res["decode_tok_s"] = {b: _decode_tok_s(model, b, ctx, steps, graphs) for b in batches}
    if dev.type == "cuda":
        res["step_ms"] = {b: 1e3 * b / res["decode_tok_s"][b] for b in batches}
        res["gemm_floor_ms"] = {b: 1e3 * gemm_floor_s(model, b) for b in batches}
        res["non_gemm_ms"] = {b: res["step_ms"][b] - res["gemm_floor_ms"][b] for b in batches}
        res["kernels_per_step"] = kernels_per_step(model, batches[0], ctx)
        res["peak_bytes"] = torch.cuda.max_memory_allocated()
    return res


def run_bench(args) -> dict:
    """The CLI entry: pick the source (folder or --shape), run every backend, report."""
    if (args.model is None) == (args.shape is None):
        raise EsparseError("give an exported folder or --shape NAME (not both)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if device.type == "cpu" and set(backends) - {"torch"}:
        raise EsparseError("no CUDA GPU: the dense/sparse plugin backends need one; use --backends torch for a "
                           "CPU smoke run")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    batches = args.batches if isinstance(args.batches, list) else [int(b) for b in args.batches.split(",")]
    source = RandomWeights(args.shape, device, dtype, args.layers) if args.shape else Path(args.model)
    meta = {**environment(), "model": args.shape or str(args.model), "prompt_len": args.prompt_len,
            "decode_steps": args.decode_steps, "layers": args.layers, "dtype": str(dtype),
            "compiled": not getattr(args, "no_compile", False), "cuda_graph": not args.no_cuda_graph}
    if device.type == "cuda":
        meta["read_bandwidth_Bps"] = read_bandwidth(device)
    results = bench_models(source, backends, device, dtype, args.prompt_len, batches, args.decode_steps,
                           not args.no_cuda_graph, meta["compiled"])
    if "cusparselt" in backends:
        from esparse.ft_plugin import ops

        meta["cusparselt"] = ops.CUSPARSELT.summary
    text = write_outputs(results, batches, meta, args.out)
    print(f"{meta['model']} on {meta['device']} ({meta['dtype']}), prompt {args.prompt_len}, "
          f"{args.decode_steps} decode steps")
    print(text)
    print(f"wrote {args.out}/bench.json and bench.png")
    return results


def strongest_dense(results: dict[str, dict], batch: int) -> str | None:
    """The dense backend a user would pick at ``batch``: the faster decode of torch and dense."""
    dense = [n for n in ("torch", "dense") if n in results]
    return max(dense, key=lambda n: results[n]["decode_tok_s"][batch]) if dense else None


def _table(results: dict[str, dict], batches: list[int], meta: dict) -> tuple[list[str], list[list]]:
    """The printed table: one row per metric, one column per backend and per sparse backend against the
    strongest dense (a list of rows, each a line of the output: long because the table is)."""
    names = list(results)
    sparse = [n for n in names if n in ("sparse", "cusparselt")]
    header = ["metric", *names, *[f"{n}/best dense" for n in sparse]]
    rows = []

    def row(label, get, higher_better, base=None):
        vals = [get(results[n]) if _has(get, results[n]) else float("nan") for n in names]
        r = [label, *vals]
        best = base or strongest_dense(results, batches[0])
        for n in sparse:
            if best is None or not _has(get, results[best]):
                r.append("")
                continue
            d, s = get(results[best]), get(results[n])
            r.append(f"{(s / d if higher_better else d / s):.3f}x vs {best}" if higher_better is not None
                     else f"{s / d:.3f}x vs {best}")
        rows.append(r)

    row("prefill ms", lambda r: r["prefill_s"] * 1e3, False)
    bw = meta.get("read_bandwidth_Bps")
    for b in batches:
        best = strongest_dense(results, b)
        row(f"decode tok/s b={b}", lambda r, b=b: r["decode_tok_s"][b], True, best)
        row(f"  step ms b={b}", lambda r, b=b: r["step_ms"][b], False, best)
        row(f"  GEMM floor ms b={b}", lambda r, b=b: r["gemm_floor_ms"][b], False, best)
        row(f"  non-GEMM ms b={b}", lambda r, b=b: r["non_gemm_ms"][b], None, best)
        if bw:
            row(f"  % of roofline b={b}", lambda r, b=b: 100 * (r["weight_bytes"] / bw) * 1e3 / r["step_ms"][b],
                None, best)
    row("kernels per step", lambda r: r["kernels_per_step"], None)
    row("compile s", lambda r: r["compile_s"], None)
    row("weights GiB", lambda r: r["weight_bytes"] / 2**30, None)
    if all("peak_bytes" in r for r in results.values()):
        row("resident after load GiB", lambda r: r["resident_bytes"] / 2**30, None)
        row("peak while loading GiB", lambda r: r["load_peak_bytes"] / 2**30, None)
        row("peak GiB", lambda r: r["peak_bytes"] / 2**30, None)
    row("load s", lambda r: r["load_s"], None)
    row("first prefill s", lambda r: r["first_prefill_s"], None)
    return header, rows


def _has(get, r: dict) -> bool:
    try:
        get(r)
        return True
    except KeyError:
        return False


def bench_models(source: WeightSource | Path, backends: list[str], device, dtype, prompt_len: int,
                 batches: list[int], steps: int, graphs: bool, compiled: bool = True) -> dict[str, dict]:
    """Each backend in turn, the previous one released first: build (timed, with the memory it leaves and its
    peak while loading), then :func:`measure`."""
    results = {}
    for be in backends:
        src = FTFolder(source) if isinstance(source, Path) else source
        if be in ("sparse", "cusparselt") and src.cfg.nm != (2, 4):
            raise EsparseError("the sparse backend needs a 2:4 folder")
        base = 0
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()  # what an earlier backend left (e.g. cuBLAS workspaces)
        t0 = time.perf_counter()
        model = build_decoder(src, device, dtype, be)
        sync(device)
        load = {"load_s": time.perf_counter() - t0}
        if device.type == "cuda":
            load.update(resident_bytes=torch.cuda.memory_allocated() - base,
                        load_peak_bytes=torch.cuda.max_memory_allocated() - base)
        log.info("benchmarking %s (built in %.1f s)", be, load["load_s"])
        results[be] = {**load, **measure(model, prompt_len, batches, steps, graphs, compiled)}
        if device.type == "cuda":
            results[be]["peak_bytes"] -= base
        if be == "cusparselt":
            from esparse.ft_plugin import ops

            results[be]["plan_inits"] = ops.plan_inits()  # cuSPARSELt plans this process built (shared per shape)
        del model
    return results


def write_outputs(results: dict, batches: list[int], meta: dict, out: Path) -> str:
    header, rows = _table(results, batches, meta)
    text = format_table(header, rows)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", {"meta": meta, "results": results})
    fig, ax = new_figure(1, 2, figsize=(11, 4))
    for be, r in results.items():
        ax[0].plot(batches, [r["decode_tok_s"][b] for b in batches], marker="o", label=be)
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("batch")
    ax[0].set_ylabel("decode tokens/s")
    ax[0].legend()
    ax[1].bar(list(results), [r["prefill_s"] * 1e3 for r in results.values()])
    ax[1].set_ylabel(f"prefill ms ({meta.get('prompt_len')} tokens)")
    fig.suptitle(f"{meta.get('model')} on {meta.get('device')}")
    save_figure(fig, out / "bench.png")
    return text
