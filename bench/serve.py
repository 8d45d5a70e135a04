"""Serving benchmark: ``esparse serve`` dense, then sparse, on the same model, under the same load.

    python bench/serve.py --shape llama-7b                  # random LLaMA-7B-shaped 2:4 weights on the GPU
    python bench/serve.py FT_DIR                            # an exported 2:4 folder
    python bench/serve.py --shape smollm2-135m --layers 2 --device cpu --modes dense \\
        --rates inf --concurrencies 4 --num-prompts 8 --input-len 16 --output-len 8     # CPU smoke run

For each mode a server process is started (``esparse serve``, port chosen by the system, its log under --out),
warmed up, then driven by the official ``openai`` client in an asyncio load loop at each load point:

* ``--rates``: requests arrive as a Poisson process of that many requests/s (exponential gaps, seeded), at most
  ``--max-concurrency`` outstanding (default: the server's --max-batch); ``inf`` sends them all at once;
* ``--concurrencies``: closed loop, that many requests outstanding (a new one as soon as one ends).

Every request streams (one server-sent chunk per token) with a prompt of ``--input-len`` random token ids and
``max_tokens = --output-len`` with ``ignore_eos`` (fixed output lengths), greedy. Per request: TTFT (send to
first chunk), ITL (each gap between chunks), TPOT ((latency - TTFT) / (output tokens - 1)), latency; per point:
p50 and p99 of each, output tokens/s and requests/s over the point's wall time, and from the server's /metrics the
mean decode step and mean running batch. A point stops sending after ``--num-prompts`` requests or
``--duration`` seconds, whichever comes first.

Writes serve_<mode>.json per mode as soon as it is done, then serve.json (both modes, side by side, with
sparse/dense ratios per point) and serve.png under --out; ``--report-only`` rebuilds those two from the per-mode
files (dense and sparse may be run in separate invocations).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from esparse.format.shapes import SHAPES
from esparse.report import environment, format_table, new_figure, save_figure, write_json

log = logging.getLogger("bench.serve")
LISTEN = re.compile(r"serving (\S+) on http://(\S+):(\d+) ")
MODES = ("dense", "sparse")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics; nan when empty."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---- the server process -------------------------------------------------------------------------------------------
class ServerProcess:
    """``esparse serve`` in a child process; a context manager that always stops it (SIGTERM, then SIGKILL)."""

    def __init__(self, args: argparse.Namespace, mode: str, log_path: Path):
        self.cmd = [sys.executable, "-m", "esparse.cli", "serve"]
        self.cmd += ["--shape", args.shape] if args.shape else [str(args.model)]
        if args.layers:
            self.cmd += ["--layers", str(args.layers)]
        self.cmd += [f"--{mode}", "--device", args.device, "--host", "127.0.0.1", "--port", "0",
                     "--max-batch", str(args.max_batch), "--max-len", str(args.max_len),
                     "--max-queue", str(max(args.num_prompts, 1)), *args.server_args.split()]
        self.log_path, self.timeout = log_path, args.start_timeout
        self.proc: subprocess.Popen | None = None
        self.url = self.model = ""

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        log.info("starting %s", " ".join(self.cmd))
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        try:
            while True:
                m = LISTEN.search(self.log_path.read_text())
                if m:
                    self.model, self.url = m.group(1), f"http://{m.group(2)}:{m.group(3)}"
                    break
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log_path}")
                if time.monotonic() - t0 > self.timeout:
                    raise RuntimeError(f"the server did not start in {self.timeout:.0f} s; see {self.log_path}")
                time.sleep(0.5)
            _wait_healthy(self.url, self.timeout - (time.monotonic() - t0))
        except BaseException:
            self.__exit__()
            raise
        log.info("server ready at %s (%.0f s)", self.url, time.monotonic() - t0)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _wait_healthy(url: str, timeout: float) -> None:
    import httpx

    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{url}/health did not answer 200 in time")
        time.sleep(0.5)


def scrape(url: str) -> dict[str, float]:
    """The server's unlabelled Prometheus samples (counters, gauges, histogram sums and counts)."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---- the load ---------------------------------------------------------------------------------------------------
async def one_request(client, model: str, prompt: list[int], output_len: int, timeout: float) -> dict:
    """Send one streaming completion; times from just before the request to each content chunk."""
    t0 = time.perf_counter()
    chunks: list[float] = []
    n_out = None
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=output_len, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, timeout=timeout)
        async for ch in stream:
            if ch.choices and ch.choices[0].text:
                chunks.append(time.perf_counter())
            if ch.usage is not None:
                n_out = ch.usage.completion_tokens
    except Exception as e:  # a failed request is counted and reported, not raised
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    end = time.perf_counter()
    if not chunks or n_out is None:
        return {"ok": False, "error": "no tokens or no usage in the stream"}
    ttft = chunks[0] - t0
    return {"ok": True, "ttft": ttft, "latency": end - t0, "output_tokens": n_out,
            "itl": [b - a for a, b in zip(chunks, chunks[1:])],
            "tpot": (end - t0 - ttft) / (n_out - 1) if n_out > 1 else None}


async def run_point(url: str, model: str, prompts: list[list[int]], output_len: int, rate: float,
                    concurrency: int, duration: float, timeout: float, seed: int) -> dict:
    """One load point: Poisson arrivals at ``rate`` (inf: all at once) with at most ``concurrency`` outstanding."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)

    async def limited(prompt):
        async with sem:
            return await one_request(client, model, prompt, output_len, timeout)

    t0 = time.perf_counter()
    tasks = []
    for prompt in prompts:
        if time.perf_counter() - t0 > duration:
            break
        tasks.append(asyncio.create_task(limited(prompt)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    await client.close()
    return summarize(results, wall)


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    itl = [g for r in ok for g in r["itl"]]
    lat = [r["latency"] for r in ok]
    out_tokens = sum(r["output_tokens"] for r in ok)
    row = {"sent": len(results), "completed": len(ok), "failed": len(results) - len(ok), "wall_s": wall,
           "requests_per_s": len(ok) / wall, "output_tok_per_s": out_tokens / wall, "output_tokens": out_tokens}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("latency", lat)):
        row[f"{name}_p50_ms"] = 1e3 * percentile(xs, 50)
        row[f"{name}_p99_ms"] = 1e3 * percentile(xs, 99)
        row[f"{name}_mean_ms"] = 1e3 * sum(xs) / len(xs) if xs else float("nan")
    errors = sorted({r["error"] for r in results if not r["ok"]})
    if errors:
        row["errors"] = errors[:5]
    return row


def load_points(args) -> list[tuple[float, int]]:
    """(rate, max outstanding) of each point: the rates at --max-concurrency, then closed loops."""
    cap = args.max_concurrency or args.max_batch
    points = [(r, cap) for r in args.rates] + [(math.inf, c) for c in args.concurrencies]
    return list(dict.fromkeys(points))  # rate inf at the cap is the closed loop at the cap: run it once


def point_label(rate: float, conc: int) -> str:
    return f"rate {rate:g}/s, <= {conc}" if math.isfinite(rate) else f"all at once, {conc} outstanding"


def bench_mode(args, mode: str, vocab: int) -> dict:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(10, vocab - 10) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    points = []
    with ServerProcess(args, mode, args.out / f"server_{mode}.log") as srv:
        warm = [[rng.randrange(10, vocab - 10) for _ in range(args.input_len)] for _ in range(args.warmup)]
        if warm:  # first prefills and kernel autotuning happen here, outside the timed points
            asyncio.run(run_point(srv.url, srv.model, warm, args.output_len, math.inf, args.max_batch, 1e9,
                                  args.request_timeout, 0))
        for rate, conc in load_points(args):
            before = scrape(srv.url)
            row = asyncio.run(run_point(srv.url, srv.model, prompts, args.output_len, rate, conc, args.duration,
                                        args.request_timeout, args.seed))
            after = scrape(srv.url)
            steps = after["esparse_decode_step_seconds_count"] - before["esparse_decode_step_seconds_count"]
            if steps:
                row["decode_step_mean_ms"] = 1e3 * (after["esparse_decode_step_seconds_sum"]
                                                    - before["esparse_decode_step_seconds_sum"]) / steps
                row["mean_running_batch"] = (after["esparse_decode_rows_total"]
                                             - before["esparse_decode_rows_total"]) / steps
            row.update(rate=rate if math.isfinite(rate) else "inf", concurrency=conc)
            log.info("%s %s: %.1f output tok/s, TPOT p50 %.1f ms, TTFT p50 %.0f ms, %d failed", mode,
                     point_label(rate, conc), row["output_tok_per_s"], row["tpot_p50_ms"], row["ttft_p50_ms"],
                     row["failed"])
            points.append(row)
        after = scrape(srv.url)
    return {"mode": mode, "points": points, "server_idle": {k: after.get(k) for k in (
        "esparse_kv_slots_used", "esparse_running_requests", "esparse_waiting_requests")}}


# ---- the report -------------------------------------------------------------------------------------------------
def report(out: Path) -> str:
    """serve.json and serve.png from the serve_<mode>.json files in ``out``; returns the table."""
    runs = {m: json.loads((out / f"serve_{m}.json").read_text()) for m in MODES if (out / f"serve_{m}.json").is_file()}
    if not runs:
        raise SystemExit(f"no serve_<mode>.json in {out}")
    first = next(iter(runs.values()))
    same = ("model", "layers", "input_len", "output_len", "max_batch", "max_len", "num_prompts", "server_args", "seed")
    for mode, run in runs.items():
        diff = [k for k in same if run["meta"].get(k) != first["meta"].get(k)]
        if diff or len(run["points"]) != len(first["points"]):
            raise SystemExit(f"serve_{mode}.json was run with other settings ({', '.join(diff) or 'load points'}): "
                             "rerun both modes with the same flags")
    labels = [point_label(float(p["rate"]), p["concurrency"]) for p in first["points"]]
    cols = [("output tok/s", "output_tok_per_s"), ("req/s", "requests_per_s"), ("TTFT p50", "ttft_p50_ms"),
            ("TTFT p99", "ttft_p99_ms"), ("TPOT p50", "tpot_p50_ms"), ("TPOT p99", "tpot_p99_ms"),
            ("ITL p50", "itl_p50_ms"), ("ITL p99", "itl_p99_ms"), ("batch", "mean_running_batch")]
    header = ["point", "mode", *[c for c, _ in cols], "failed"]
    rows, ratios = [], []
    for i, label in enumerate(labels):
        for mode, run in runs.items():
            p = run["points"][i] if i < len(run["points"]) else {}
            rows.append([label, mode, *[p.get(k, float("nan")) for _, k in cols], p.get("failed", "")])
        if len(runs) == 2 and all(i < len(r["points"]) for r in runs.values()):
            d, s = runs["dense"]["points"][i], runs["sparse"]["points"][i]
            ratios.append({"point": label, "output_tok_per_s_sparse_over_dense": s["output_tok_per_s"]
                           / d["output_tok_per_s"], "tpot_p50_sparse_over_dense": s["tpot_p50_ms"] / d["tpot_p50_ms"]})
    text = format_table(header, rows)
    if ratios:
        text += "\n\n" + format_table(["point", "sparse/dense output tok/s", "sparse/dense TPOT p50"],
                                      [[r["point"], r["output_tok_per_s_sparse_over_dense"],
                                        r["tpot_p50_sparse_over_dense"]] for r in ratios])
    write_json(out / "serve.json", {"meta": first["meta"], "runs": runs, "sparse_over_dense": ratios})
    fig, ax = new_figure(2, 2, figsize=(13, 8))
    x = list(range(len(labels)))
    for (title, key), a in zip([("output tokens/s", "output_tok_per_s"), ("TPOT p50 ms", "tpot_p50_ms"),
                                ("TTFT p50 ms", "ttft_p50_ms"), ("ITL p99 ms", "itl_p99_ms")], ax.flat):
        for mode, run in runs.items():
            a.plot(x[:len(run["points"])], [p[key] for p in run["points"]], marker="o", label=mode)
        a.set_title(title)
        a.set_xticks(x, labels, rotation=25, ha="right", fontsize=7)
        a.legend()
    m = first["meta"]
    fig.suptitle(f"esparse serve: {m['model']} on {m['device']}, {m['input_len']} in / {m['output_len']} out")
    save_figure(fig, out / "serve.png")
    return text


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        r = math.inf if part == "inf" else float(part)
        if not r > 0:
            raise argparse.ArgumentTypeError(f"rate {part} is not positive")
        rates.append(r)
    return rates


def parse_ints(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, nargs="?", help="exported folder (or --shape)")
    ap.add_argument("--shape", choices=tuple(SHAPES), help="random 2:4 weights of a model shape")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (--shape)")
    ap.add_argument("--modes", default="dense,sparse")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rates", type=parse_rates, default=parse_rates("4,16,64"), help="requests/s (inf: burst)")
    ap.add_argument("--concurrencies", type=parse_ints, default=parse_ints("1,64"), help="closed-loop points")
    ap.add_argument("--max-concurrency", type=int, default=None, help="outstanding cap of the rate points")
    ap.add_argument("--num-prompts", type=int, default=200, help="requests per point (at most)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds a point keeps sending (at most)")
    ap.add_argument("--warmup", type=int, default=8, help="untimed requests after the server starts")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--server-args", default="", help="more esparse serve flags, e.g. '--graph-buckets 8,16,32,64'")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="client timeout per request, s")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds for a server to become ready")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/serve"))
    ap.add_argument("--report-only", action="store_true", help="rebuild serve.json/png from serve_<mode>.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):  # one line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    if not args.report_only:
        if (args.model is None) == (args.shape is None):
            ap.error("give an exported folder or --shape NAME (not both)")
        if args.input_len + args.output_len > args.max_len:
            ap.error("--input-len + --output-len exceed --max-len")
        if args.model is not None:
            from esparse.format.ft_loader import FTFolder

            vocab = FTFolder(Path(args.model)).cfg.vocab
        else:
            vocab = SHAPES[args.shape]["vocab"]
        meta = {**environment(), "model": args.shape or str(args.model), "layers": args.layers,
                "input_len": args.input_len, "output_len": args.output_len, "max_batch": args.max_batch,
                "max_len": args.max_len, "num_prompts": args.num_prompts, "duration_cap_s": args.duration,
                "server_args": args.server_args, "seed": args.seed, "client": "openai AsyncOpenAI, streaming",
                "cpu_count": os.cpu_count()}
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            if mode not in MODES:
                ap.error(f"unknown mode {mode}: use dense and/or sparse")
            run = {"meta": meta, **bench_mode(args, mode, vocab)}
            write_json(args.out / f"serve_{mode}.json", run)
    print(report(args.out))
    print(f"wrote {args.out}/serve.json and serve.png")


if __name__ == "__main__":
    main()
