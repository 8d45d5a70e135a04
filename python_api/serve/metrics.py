"""Prometheus metrics of the server, in a registry of its own (several servers in one process, as in the tests,
do not share counters).

Request-level latencies are measured inside the engine from the moment a request was queued: time to first token
(TTFT), time per output token after the first (TPOT = (end - first token) / (tokens - 1)), end-to-end latency.
Gauges give the state at the last engine iteration: running batch size, KV-cache rows in use, queue length.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .scheduler import Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0, 20.0, 40.0, 80.0)

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]


class ServeMetrics:
    """The engine's observer (engine.Observer) and the HTTP layer's request counter."""

    def __init__(self, kv_slots: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("esparse_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.finished = Counter("esparse_request_finished", "sequences that left the engine, by finish reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("esparse_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("esparse_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("esparse_time_to_first_token_seconds", "queued to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("esparse_time_per_output_token_seconds", "mean gap between a request's tokens after "
                              "the first", registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("esparse_e2e_request_latency_seconds", "queued to last token", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.decode_rows = Counter("esparse_decode_rows", "sequences decoded, summed over decode steps (over "
                                   "the step count: the mean running batch)", registry=r)
        self.step = Histogram("esparse_decode_step_seconds", "one decode step of the running batch", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.running = Gauge("esparse_running_requests", "sequences in the running batch", registry=r)
        self.waiting = Gauge("esparse_waiting_requests", "requests queued for a KV-cache slot", registry=r)
        self.slots_used = Gauge("esparse_kv_slots_used", "KV-cache rows held by a sequence", registry=r)
        Gauge("esparse_kv_slots_total", "KV-cache rows (--max-batch)", registry=r).set(kv_slots)

    # engine.Observer
    def on_iteration(self, waiting: int, running: int, slots_used: int, step_s: float | None, rows: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        self.slots_used.set(slots_used)
        if step_s is not None:
            self.step.observe(step_s)
            self.decode_rows.inc(rows)

    def on_first_token(self, seq: Sequence, ttft_s: float) -> None:
        self.prompt_tokens.inc(len(seq.prompt))
        self.ttft.observe(ttft_s)

    def on_finish(self, seq: Sequence, now: float) -> None:
        reason = seq.finish_reason or "unknown"
        self.finished.labels(reason).inc()
        n = len(seq.generated)
        self.generation_tokens.inc(n)
        if reason in ("stop", "length") and seq.first_token_at is not None:
            self.e2e.observe(now - seq.arrival)
            if n > 1:
                self.tpot.observe((now - seq.first_token_at) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
