"""The engine: one thread owns the model and its KV cache and runs continuous batching.

Each iteration of the loop:

1. drop cancelled sequences (client gone, timeout, stop string found): their rows are freed at once;
2. admit waiting sequences into free rows (scheduler.py) and prefill each into its own row
   (``model(prompt, cache.rows(r, r + 1), 0)``), sampling its first token;
3. one decode step for every running sequence together, each row at its own position (``start`` [B]), over
   rows 0..high_water-1 of the one cache; on a GPU the step is replayed from the CUDA graph of the smallest
   batch bucket (powers of two up to ``max_batch``) that covers those rows;
4. hand the new tokens to the sequences' sinks; a sequence that hit EOS or its ``max_tokens`` leaves and its
   row is free for the next iteration's admissions.

Rows are independent (per-row positions, per-row attention lengths, no padding), so a sequence gets the same
tokens whether it runs alone or beside others; rows not in use inside the decoded range are dummies at position
0 whose results are ignored. The loop never lets an exception escape: a failed prefill fails that request, a
failed decode step fails the running ones, and the loop carries on.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..generate import sample
from ..model import GraphDecodeStep, KVCache, Transformer
from .scheduler import QueueFull, SamplingParams, Scheduler, Sequence, ShuttingDown

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "Event", "QueueFull", "SamplingParams", "Sequence", "ShuttingDown",
           "batch_buckets"]


@dataclass(frozen=True)
class Event:
    """What a sequence receives from the engine: a token (with the finish reason when it is the last), or the end
    without a token (``cancelled``), or an error (the request failed; the server goes on)."""

    token: int | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None


class Observer(Protocol):
    """Where the engine reports what metrics need (metrics.py implements it)."""

    def on_iteration(self, waiting: int, running: int, slots_used: int, step_s: float | None, rows: int) -> None:
        """State after an iteration; ``step_s``/``rows``: its decode step's seconds and sequences (None/0: none)."""

    def on_first_token(self, seq: Sequence, ttft_s: float) -> None: ...

    def on_finish(self, seq: Sequence, now: float) -> None: ...


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # KV-cache rows = sequences decoded together
    max_len: int = 2048  # slots per row: prompt + generated tokens of one request
    max_queue: int = 256  # requests waiting for a row before new ones are refused
    prefill_budget: int = 2048  # prompt tokens prefilled per iteration (at least one request)
    cuda_graph: bool = True  # GPU: replay decode steps from per-bucket CUDA graphs
    compile: bool = True  # GPU: torch.compile the decode step (captured in the graphs)
    graph_buckets: tuple[int, ...] | None = None  # batch sizes with a graph (None: powers of two, and max_batch)


def batch_buckets(max_batch: int) -> list[int]:
    """Decode batch sizes with a captured graph: powers of two below ``max_batch``, and ``max_batch``. A step
    over n rows replays the smallest bucket >= n; the extra rows are dummies, nearly free in a decode step that
    is bound by reading the weights, so few buckets (each one compiled and captured at start) are enough."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


class Engine:
    """Continuous batching over one :class:`Transformer` (see the module docstring for the loop)."""

    def __init__(self, model: Transformer, config: EngineConfig, eos_ids: set[int] | None = None,
                 observer: Observer | None = None):
        if config.max_len > model.cfg.max_pos:
            raise ValueError(f"max_len {config.max_len} exceeds the model's {model.cfg.max_pos} positions")
        self.model, self.config = model, config
        self.eos_ids = set(eos_ids or ())
        self.observer = observer
        self.device = model.device
        self.vocab = model.cfg.vocab
        self.scheduler = Scheduler(config.max_batch, config.max_queue, config.prefill_budget)
        self.cache: KVCache = model.new_cache(config.max_batch, config.max_len)
        self._last = [0] * config.max_batch  # per row: the token to feed at the next decode step
        self._pos = [0] * config.max_batch  # per row: its slot (position) for that token
        self._graphs: dict[int, GraphDecodeStep] = {}
        self._host = None  # GPU: a pinned buffer the new tokens are copied into, and the event that says they are in
        if self.device.type == "cuda":
            self._host = (torch.empty(config.max_batch, dtype=torch.long, pin_memory=True), torch.cuda.Event())
        self._buckets: list[int] = []
        self._rng = random.Random()
        self._stopping = False
        self._hard_stop = False
        self._thread: threading.Thread | None = None
        self.on_events: Callable[[list[tuple[Sequence, Event]]], None] = _to_sinks
        self.steps = 0  # decode steps run (for tests and logs)
        self._prepare_gpu()

    # ---- setup -------------------------------------------------------------------------------------------------
    def _prepare_gpu(self) -> None:
        """Compile the decode step and capture one graph per batch bucket, each over rows 0..bucket-1 of the one
        cache (a rows() view: the graphs share the cache, so a row keeps its KV whichever bucket decodes it)."""
        if self.device.type != "cuda":
            return
        if self.config.compile:
            self.model.compile_decode()
        if not self.config.cuda_graph:
            return
        mb = self.config.max_batch
        given = self.config.graph_buckets
        self._buckets = sorted({b for b in given if b < mb} | {mb}) if given else batch_buckets(mb)
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in self._buckets:
                self._graphs[b] = GraphDecodeStep(self.model, self.cache.rows(0, b))
        log.info("captured decode graphs for batch buckets %s in %.1f s", self._buckets, time.perf_counter() - t0)

    # ---- the API other threads call ----------------------------------------------------------------------------
    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError when a request cannot run here (the HTTP layer turns it into a 400 first)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if len(prompt) + params.max_tokens > self.config.max_len:
            raise ValueError(f"{len(prompt)} prompt tokens + {params.max_tokens} max_tokens exceed the context of "
                             f"{self.config.max_len} tokens")
        bad = next((t for t in prompt if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab - 1})")

    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Event], None]) -> Sequence:
        """Queue a request; raises QueueFull (the queue is at its bound) or ValueError (see :meth:`check`)."""
        self.check(prompt, params)
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        seq = Sequence(list(prompt), params, sink)
        self.scheduler.submit(seq)
        self._report()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence (from any thread): it leaves at the engine's next iteration and its row is freed."""
        if not seq.finished:
            seq.cancelled = True
            self.scheduler.wake()

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="esparse-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is running and waiting (a drain), then end the loop; after ``timeout`` seconds the rest
        are failed. New submissions are refused from now on."""
        self._stopping = True
        self.scheduler.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("engine did not drain in %.0f s: failing what is left", timeout)
                self._hard_stop = True
                self.scheduler.wake()
                self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # a new thread starts on the default GPU
        with torch.no_grad():  # grad mode is per thread (no_grad, as generate() runs the same graphs)
            while True:
                sch = self.scheduler
                sch.wait_for_work(lambda: self._stopping, timeout=1.0)
                waiting, running, _ = sch.counts()
                if self._hard_stop or (self._stopping and not waiting and not running):
                    break
                try:
                    self.iteration()
                except Exception:  # a bug in the loop itself: fail what runs, keep serving
                    log.exception("engine iteration failed")
                    self._fail_all("internal error in the engine")
            self._fail_all("the server is shutting down")

    @torch.no_grad()
    def iteration(self) -> None:
        """One pass of the loop (public so that tests can step the engine without its thread)."""
        events: list[tuple[Sequence, Event]] = []
        sch = self.scheduler
        for seq in sch.drop_cancelled_waiting():
            self._finish(seq, "cancelled", events)
        for seq in list(sch.running.values()):
            if seq.cancelled:
                self._finish(seq, "cancelled", events)
        self._prefill(sch.admit(), events)
        step_s, rows = None, len(sch.running)
        if rows:
            t0 = time.perf_counter()
            self._decode(events)
            step_s = time.perf_counter() - t0
        self._report(step_s, rows)  # first: a client that has its last token sees its row free in /metrics
        if events:
            self.on_events(events)

    def _prefill(self, seqs: list[Sequence], events: list) -> None:
        firsts: list[tuple[Sequence, torch.Tensor]] = []
        for seq in seqs:
            try:
                ids = torch.tensor([seq.prompt], device=self.device)
                logits = self.model(ids, self.cache.rows(seq.slot, seq.slot + 1), 0)[:, -1]
                if seq.params.temperature > 0:
                    seq.generator = torch.Generator(device=self.device).manual_seed(
                        seq.params.seed if seq.params.seed is not None else self._rng.getrandbits(63))
                firsts.append((seq, self._sample_one(seq, logits)))
            except Exception as e:
                log.exception("prefill of a %d-token prompt failed", len(seq.prompt))
                self._fail(seq, f"prefill failed: {type(e).__name__}", events)
        if not firsts:
            return
        tokens = self._to_host(torch.cat([t for _, t in firsts]))  # one device sync for all of them
        for (seq, _), tok in zip(firsts, tokens):
            self._pos[seq.slot] = len(seq.prompt)
            self._accept(seq, tok, events)

    def _sample_one(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        p = seq.params
        return sample(logits, p.temperature, p.top_p, seq.generator).reshape(1)

    def _decode(self, events: list) -> None:
        sch = self.scheduler
        n = sch.slots.high_water()
        b = next((k for k in self._buckets if k >= n), n)
        ids = torch.tensor(self._last[:b], device=self.device).view(b, 1)
        starts = torch.tensor(self._pos[:b], device=self.device)
        running = list(sch.running.values())
        try:
            if b in self._graphs:
                logits = self._graphs[b](ids, starts)[:, -1]
            else:
                logits = self.model(ids, self.cache.rows(0, b), starts)[:, -1]
            tokens = logits.argmax(-1)
            sampled = [s for s in running if s.params.temperature > 0]
            if sampled:
                tokens = tokens.clone()
                for seq in sampled:
                    tokens[seq.slot] = self._sample_one(seq, logits[seq.slot: seq.slot + 1])[0]
            host = self._to_host(tokens)
        except Exception as e:
            log.exception("decode step at batch %d failed", b)
            for seq in running:
                self._fail(seq, f"decode failed: {type(e).__name__}", events)
            return
        self.steps += 1
        for seq in running:
            self._pos[seq.slot] += 1
            self._accept(seq, host[seq.slot], events)

    def _to_host(self, tokens: torch.Tensor) -> list[int]:
        """The tokens as a list. On a GPU the wait for them is an event's synchronize, which lets go of the GIL
        (the HTTP threads stream the previous step's tokens meanwhile), then a copy out of pinned memory."""
        if self._host is None:
            return tokens.tolist()
        buf, ready = self._host
        out = buf[: tokens.numel()]
        out.copy_(tokens, non_blocking=True)
        ready.record()
        ready.synchronize()
        return out.tolist()

    def _accept(self, seq: Sequence, tok: int, events: list) -> None:
        """A new token for ``seq``: record, decide whether it ends the sequence, queue its event."""
        now = time.perf_counter()
        seq.generated.append(tok)
        if seq.first_token_at is None:
            seq.first_token_at = now
            if self.observer is not None:
                self.observer.on_first_token(seq, now - seq.arrival)
        reason = None
        if tok in self.eos_ids and not seq.params.ignore_eos:
            reason = "stop"
        elif len(seq.generated) >= seq.params.max_tokens:
            reason = "length"
        if reason is None:
            self._last[seq.slot] = tok
            events.append((seq, Event(tok)))
            return
        events.append((seq, Event(tok, reason)))
        self._leave(seq, reason)

    def _leave(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.slot is not None:
            self._last[seq.slot] = self._pos[seq.slot] = 0  # a dummy row until the slot is taken again
        self.scheduler.release(seq)
        if self.observer is not None:
            self.observer.on_finish(seq, time.perf_counter())

    def _finish(self, seq: Sequence, reason: str, events: list) -> None:
        self._leave(seq, reason)
        events.append((seq, Event(None, reason)))

    def _fail(self, seq: Sequence, message: str, events: list) -> None:
        self._leave(seq, "error")
        events.append((seq, Event(None, "error", message)))

    def _fail_all(self, message: str) -> None:
        events: list[tuple[Sequence, Event]] = []
        sch = self.scheduler
        with sch.lock:
            left = [*sch.waiting, *sch.running.values()]
            sch.waiting.clear()
        for seq in left:
            if not seq.finished:
                self._fail(seq, message, events)
        self._report()
        if events:
            self.on_events(events)

    def _report(self, step_s: float | None = None, rows: int = 0) -> None:
        if self.observer is not None:
            self.observer.on_iteration(*self.scheduler.counts(), step_s, rows)


def _to_sinks(events: list[tuple[Sequence, Event]]) -> None:
    for seq, ev in events:
        seq.sink(ev)
