"""CUDA graph capture and the timers built on it: the one timing room of every benchmark and of the runtime's
graphed decode step (no model code here, so the GEMM benchmark times linears without building a model)."""

from __future__ import annotations

import statistics
import time

import torch

_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for every capture's warm-up: torch keeps a cuBLAS workspace per stream for the
    life of the process, so a fresh stream per graph would leave one more workspace each time."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _CAPTURE_STREAMS[index]


def capture_graph(fn, device: torch.device, warmup: int = 1):
    """Run ``fn`` ``warmup`` times on ``device``'s capture stream (plans, workspaces, autotuning happen outside
    the graph), then capture one call; returns (graph, what the captured call returned)."""
    stream = capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def sync(dev) -> None:
    """Wait for the device (a no-op on the CPU): timers stop on it."""
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, dev, repeats: int, warmup: int = 1) -> float:
    """Median seconds of one call of ``fn`` over ``repeats`` calls after ``warmup`` calls: CUDA events on a GPU
    (what the device spent, launch included), wall clock on the CPU. The one timer of every benchmark."""
    dev = torch.device(dev)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(dev)
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def graph_seconds(calls, repeats: int) -> float:
    """Seconds per call of ``calls`` (callables) captured back to back in one CUDA graph and replayed: how a
    decode step sees them (no host overhead between calls). Warm-up outside the capture (plans, algorithms)."""
    graph, _ = capture_graph(lambda: [fn() for fn in calls], torch.device("cuda"))
    return median_seconds(graph.replay, "cuda", repeats, warmup=3) / len(calls)


def read_bandwidth(dev) -> float:
    """Bytes/s the GPU reads: a 2 GiB tensor summed (the roofline's denominator, measured in the same run)."""
    x = torch.ones(2**30, device=dev, dtype=torch.float16)
    return 2**31 / median_seconds(x.sum, dev, 10, warmup=2)
