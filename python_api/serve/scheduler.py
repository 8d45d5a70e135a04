"""Who runs when: the requests inside the engine (:class:`Sequence`), the KV-cache rows they hold
(:class:`SlotPool`) and the bounded queue of those waiting for a row (:class:`Scheduler`).

Nothing here touches the model or a tensor: the engine (engine.py) asks the scheduler which sequences to
prefill this iteration and which rows to decode, and tells it which sequences finished.

Slots: the KV cache has ``max_batch`` rows and each running sequence owns one row for its whole life (a token's
position is its slot index in that row, so a row cannot be shared). A new sequence takes the lowest free row, so
the rows in use stay packed at the bottom and the decode step runs over rows ``0..high_water-1`` only. A row
freed in the middle leaves a hole that is decoded as a harmless dummy (position 0, result ignored) until a new
sequence fills it; copying the last row into the hole instead would move up to ``layers x max_len`` KV entries
per departure, which costs more than the dummy row's share of a memory-bound decode step.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The waiting queue is at its bound: the request is refused now (HTTP 429) rather than queued without end."""


class ShuttingDown(Exception):
    """The engine is draining for shutdown and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops (validated by the HTTP layer)."""

    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (load tests want fixed output lengths)


@dataclass(eq=False)
class Sequence:
    """One request as the engine sees it: prompt ids in, generated ids out, one KV row while running.

    ``sink`` receives this sequence's events from the engine thread (see engine.Event); ``cancelled`` is set from
    any thread (client gone, timeout, stop string found) and acted on at the engine's next iteration."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[object], None]
    id: int = field(default_factory=itertools.count().__next__)
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: object | None = None  # the torch.Generator of a sampled request (made by the engine)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SlotPool:
    """The KV-cache rows: lowest-free allocation, so rows in use stay packed at the bottom."""

    def __init__(self, n: int):
        self.n = n
        self._free = list(range(n))  # sorted
        self._used: set[int] = set()

    def take(self) -> int:
        slot = self._free.pop(0)
        self._used.add(slot)
        return slot

    def give(self, slot: int) -> None:
        self._used.remove(slot)
        bisect.insort(self._free, slot)

    @property
    def in_use(self) -> int:
        return len(self._used)

    @property
    def free(self) -> int:
        return len(self._free)

    def high_water(self) -> int:
        """One past the highest row in use: the decode step covers rows 0..high_water-1."""
        return max(self._used) + 1 if self._used else 0


class Scheduler:
    """The waiting queue (bounded, first come first served) and the running set, behind one lock.

    ``submit`` is called from the HTTP threads/loop; everything else from the engine thread. Admission per
    iteration is bounded by free rows and by a prefill token budget, so a burst of long prompts cannot stall the
    running sequences' decode for more than about one budget's worth of prefill (at least one sequence is always
    admitted, however long its prompt)."""

    def __init__(self, max_batch: int, max_queue: int, prefill_budget: int):
        self.slots = SlotPool(max_batch)
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.lock = threading.Condition()
        self.peak_running = 0  # the largest running batch seen (tests check that batching happened)

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; QueueFull when ``max_queue`` requests already wait beyond the free rows (those about to
        get a row at the next iteration do not count, so ``max_queue`` 0 still serves up to the free rows)."""
        with self.lock:
            if len(self.waiting) - self.slots.free >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting for a slot")
            self.waiting.append(seq)
            self.lock.notify()

    def wake(self) -> None:
        with self.lock:
            self.lock.notify()

    def wait_for_work(self, stop: Callable[[], bool], timeout: float | None = None) -> None:
        """Block the engine thread until something is waiting or running, or ``stop()``."""
        with self.lock:
            while not (self.waiting or self.running or stop()):
                if not self.lock.wait(timeout):
                    return

    def drop_cancelled_waiting(self) -> list[Sequence]:
        """Cancelled sequences still in the queue, removed (they never got a row)."""
        with self.lock:
            gone = [s for s in self.waiting if s.cancelled]
            if gone:
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
            return gone

    def admit(self) -> list[Sequence]:
        """Waiting sequences that get a row now, in arrival order, within the free rows and the prefill budget."""
        out: list[Sequence] = []
        tokens = 0
        with self.lock:
            while self.waiting and self.slots.free:
                seq = self.waiting[0]
                if out and tokens + len(seq.prompt) > self.prefill_budget:
                    break
                self.waiting.popleft()
                seq.slot = self.slots.take()
                self.running[seq.slot] = seq
                tokens += len(seq.prompt)
                out.append(seq)
            self.peak_running = max(self.peak_running, len(self.running))
        return out

    def release(self, seq: Sequence) -> None:
        """A running sequence leaves: its row is free for the next admission."""
        with self.lock:
            if seq.slot is not None and self.running.get(seq.slot) is seq:
                del self.running[seq.slot]
                self.slots.give(seq.slot)
            seq.slot = None

    def counts(self) -> tuple[int, int, int]:
        """(waiting, running, rows in use) at this instant."""
        with self.lock:
            return len(self.waiting), len(self.running), self.slots.in_use
