"""``esparse serve``: load the decoder (an exported folder, or random weights of a named shape for benchmarks),
build the engine (its CUDA graphs captured before the port opens) and run the HTTP server until SIGTERM/SIGINT.

Shutdown: the first SIGTERM or SIGINT stops accepting connections, lets every in-flight request finish (bounded
by the per-request timeout), stops the engine and returns (exit code 0); a second SIGINT forces the exit.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from esparse.errors import EsparseError
from esparse.limits import check_fits

from ..loader import build_decoder, default_backend, load_decoder
from ..model import Transformer
from .engine import Engine, EngineConfig
from .text import TextCodec

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 2048


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout: float = 600.0
    name: str | None = None


def open_model(folder: Path | None, shape: str | None, layers: int | None, sparse: bool, device: torch.device,
               dtype: torch.dtype, tp: int | None = None, tokenizer_dir: Path | None = None
               ) -> tuple[Transformer, TextCodec, str]:
    """(decoder, text codec, default served name) for an exported folder or a benchmark shape (no tokenizer:
    clients send token ids)."""
    if (folder is None) == (shape is None):
        raise EsparseError("give an exported folder or --shape NAME (not both)")
    if shape is not None:
        from ..random_weights import RandomWeights

        src = RandomWeights(shape, device, dtype, layers)
        model = build_decoder(src, device, dtype, default_backend(device, sparse))
        return model, TextCodec(None, {src.cfg.end_id}), shape
    model = load_decoder(folder, device=str(device), dtype=dtype, sparse=sparse, tp=tp)
    codec = TextCodec.from_folder(tokenizer_dir, model.cfg.end_id) if tokenizer_dir else TextCodec(
        None, {model.cfg.end_id})
    if tokenizer_dir is None:
        log.warning("no tokenizer beside %s: prompts must be token ids and answers are ids", folder)
    return model, codec, Path(folder).resolve().name


def make_engine(model: Transformer, codec: TextCodec, config: EngineConfig, observer=None) -> Engine:
    """The engine, its KV cache allocated (a clear error when it does not fit) and its graphs captured."""
    if config.max_len > model.cfg.max_pos:
        raise EsparseError(f"--max-len {config.max_len} exceeds the model's {model.cfg.max_pos} positions")
    cfg = model.cfg
    kv_bytes = 2 * cfg.n_layers * config.max_batch * config.max_len * cfg.n_kv * cfg.head_dim * model.dtype.itemsize
    log.info("KV cache: %d rows x %d slots = %.2f GiB", config.max_batch, config.max_len, kv_bytes / 2**30)
    check_fits(kv_bytes, model.device, f"the KV cache of --max-batch {config.max_batch} x --max-len {config.max_len}",
               "lower --max-batch or --max-len")  # refused before allocating (the CPU would not raise: it swaps)
    try:
        return Engine(model, config, codec.eos_ids, observer)
    except torch.OutOfMemoryError:
        raise EsparseError(f"the KV cache ({kv_bytes / 2**30:.1f} GiB) and decode graphs do not fit on {model.device}:"
                           " lower --max-batch or --max-len") from None


def serve(model: Transformer, codec: TextCodec, name: str, config: EngineConfig, opts: ServeOptions) -> None:
    """Run the server in this thread until it is told to stop; returns after the drain."""
    import uvicorn

    from .metrics import ServeMetrics
    from .server import bind_socket, create_app

    try:
        sock = bind_socket(opts.host, opts.port)  # before the long work: a busy port fails at once
    except OSError as e:
        raise EsparseError(f"cannot listen on {opts.host}:{opts.port} ({e.strerror or e}): choose another --port "
                           "or --host") from None
    before: dict = {}
    try:
        metrics = ServeMetrics(config.max_batch)
        engine = make_engine(model, codec, config, metrics)
        drain = opts.request_timeout + 5
        app = create_app(engine, codec, opts.name or name, metrics, opts.request_timeout, drain_timeout=drain)
        host, port = sock.getsockname()[:2]
        server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                               timeout_graceful_shutdown=int(drain) + 1))
        log.info("serving %s on http://%s:%d (max batch %d, context %d, %s linears on %s)", opts.name or name,
                 host if ":" not in host else f"[{host}]", port, config.max_batch, config.max_len, model.backend,
                 model.device)

        # uvicorn takes SIGINT/SIGTERM while it runs and, after its drain, raises the signal again for the handler
        # it found: this one (it also covers a signal just before uvicorn takes over) makes the drained server a
        # normal return, not a second interruption
        def stop(signum: int, _frame) -> None:
            server.should_exit = True

        if threading.current_thread() is threading.main_thread():
            before = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        server.run(sockets=[sock])
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        sock.close()
    log.info("server stopped")
