"""The engine seen from asyncio: each request gets an asyncio.Queue of its events.

The engine thread hands over all of an iteration's events in one ``call_soon_threadsafe`` (one wake-up of the
event loop per decode step, not one per token), and the loop puts each into its request's queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from .engine import Engine, Event, SamplingParams, Sequence

log = logging.getLogger(__name__)


class RequestTimeout(Exception):
    """The request ran past its deadline (the server's per-request timeout)."""


class RequestStream:
    """One request's events, in order, until it ends."""

    def __init__(self, engine: Engine, seq: Sequence, queue: asyncio.Queue):
        self.engine, self.seq, self.queue = engine, seq, queue

    def abort(self) -> None:
        self.engine.abort(self.seq)

    async def events(self, deadline: float) -> AsyncIterator[Event]:
        """Events until the one that ends the sequence; raises RequestTimeout at ``deadline`` (loop time). The
        sequence is aborted (its row freed) whenever the consumer stops early, for whatever reason."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise RequestTimeout
                try:
                    ev = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    raise RequestTimeout from None
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.abort()


class AsyncEngine:
    """Binds an :class:`Engine` to the running event loop (call :meth:`bind` inside it before :meth:`open`)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.loop: asyncio.AbstractEventLoop | None = None
        engine.on_events = self._from_engine

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def open(self, prompt: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request (raises QueueFull, ShuttingDown or ValueError as Engine.submit does)."""
        queue: asyncio.Queue = asyncio.Queue()
        seq = self.engine.submit(prompt, params, queue.put_nowait)
        return RequestStream(self.engine, seq, queue)

    def _from_engine(self, events: list[tuple[Sequence, Event]]) -> None:
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(_dispatch, events)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            log.debug("dropped %d events after the event loop closed", len(events))


def _dispatch(events: list[tuple[Sequence, Event]]) -> None:
    for seq, ev in events:
        seq.sink(ev)
