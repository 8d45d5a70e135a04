"""``esparse serve``: an OpenAI-compatible server with continuous batching over the decoder runtime.

Split as serving engines usually are, so each part can be used and tested alone:

* scheduler.py: requests inside the engine, KV-cache rows (slots), the bounded waiting queue;
* engine.py: the thread that owns the model and runs the continuous-batching loop (CUDA graphs per batch bucket);
* async_engine.py: the engine's events delivered to asyncio, one queue per request;
* text.py: tokenizer, chat template, incremental detokenization, stop strings;
* protocol.py: the OpenAI request/response/error shapes;
* server.py: the FastAPI app and a loopback server thread; metrics.py: Prometheus metrics;
* launch.py: what the ``esparse serve`` command runs.

The engine, scheduler and text modules need only torch and transformers; the HTTP modules need the ``serve``
extra (``pip install esparse[serve]``: fastapi, uvicorn, prometheus-client).
"""

from .engine import Engine, EngineConfig, Event, QueueFull, SamplingParams, ShuttingDown

__all__ = ["Engine", "EngineConfig", "Event", "QueueFull", "SamplingParams", "ShuttingDown"]
