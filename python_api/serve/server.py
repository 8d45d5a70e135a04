"""The HTTP layer: an OpenAI-compatible API on FastAPI over the engine, and a loopback server thread.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers server-sent events,
one chunk per token, then ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Every failure reaches the client as a JSON body in OpenAI's error shape (status 400 bad request, 404 unknown
model or route, 408 past the per-request timeout, 429 queue full with Retry-After, 500 engine failure, 503
shutting down), never as a traceback; the traceback of an unexpected error goes to the server's log. Each request
watches its connection: when the client goes away, its sequence is cancelled and its KV-cache row freed at the
engine's next iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import AsyncEngine, RequestStream, RequestTimeout
from .engine import Engine, QueueFull, SamplingParams, ShuttingDown
from .metrics import CONTENT_TYPE_LATEST, ServeMetrics
from .protocol import (
    COMPLETIONS_MAX_TOKENS,
    APIError,
    ChatRequest,
    CompletionRequest,
    Shape,
    error_body,
    usage,
)
from .text import StopMatcher, TextCodec

log = logging.getLogger(__name__)

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
SEED_MODULUS = 2**63  # torch generators take seeds below this; larger or negative seeds are reduced modulo it


class ClientGone(Exception):
    """The request's sequence was cancelled because its client disconnected."""


@dataclass
class Piece:
    """What one engine event adds to a response: text (possibly empty: held back or an incomplete character),
    the token, and the finish reason when it is the last."""

    text: str
    token: int
    finish_reason: str | None


class RequestCounter:
    """ASGI middleware: counts every HTTP answer by route and status code (unknown paths as "other")."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in ROUTES else "other", str(status["code"])).inc()


def create_app(engine: Engine, codec: TextCodec, model_name: str, metrics: ServeMetrics | None = None,
               request_timeout: float = 600.0, drain_timeout: float | None = None) -> FastAPI:
    """The application over ``engine`` (started with the app's lifespan, drained and stopped at its end).

    Long on purpose: every route is a closure over the one engine, codec and metrics of this app (FastAPI's
    usual shape), so the whole HTTP surface reads in one place; the work each route does lives in the engine,
    protocol and text modules."""
    metrics = metrics or (engine.observer if isinstance(engine.observer, ServeMetrics) else None)
    aengine = AsyncEngine(engine)
    max_len = engine.config.max_len

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.bind(asyncio.get_running_loop())
        engine.start()
        log.info("engine started: %d KV-cache rows of %d slots, queue of %d", engine.config.max_batch, max_len,
                 engine.config.max_queue)
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop, drain_timeout)
            log.info("engine stopped after %d decode steps", engine.steps)

    app = FastAPI(title="esparse", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if metrics is not None:
        app.add_middleware(RequestCounter, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON ({first.get('msg')})",
                                           "invalid_request_error"), status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        return JSONResponse(error_body(f"{where}: {first.get('msg')}", "invalid_request_error", where),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", kind),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.error("unexpected error on %s", request.url.path, exc_info=e)
        return JSONResponse(error_body(f"internal error ({type(e).__name__})", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the engine is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            raise APIError(404, "metrics are off", "not_found_error")
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "esparse", "max_model_len": max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _generate(body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await _generate(body, request, chat=True)

    # ---- one request -------------------------------------------------------------------------------------------
    def _prompt(body: CompletionRequest | ChatRequest, chat: bool) -> list[int]:
        try:
            if chat:
                return codec.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
            p = body.prompt
            if isinstance(p, list) and p and not isinstance(p[0], int):
                if len(p) != 1:
                    raise APIError(400, f"one prompt per request, got {len(p)}: send them as separate requests",
                                   param="prompt")
                p = p[0]
            return codec.encode(p) if isinstance(p, str) else list(p)
        except ValueError as e:
            raise APIError(400, str(e), param="messages" if chat else "prompt") from None
        except APIError:
            raise
        except Exception as e:  # a chat template that fails on these messages
            raise APIError(400, f"cannot render the prompt: {type(e).__name__}: {e}",
                           param="messages" if chat else "prompt") from None

    def _params(body: CompletionRequest | ChatRequest, chat: bool, n_prompt: int) -> SamplingParams:
        room = max_len - n_prompt
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if room < 1:
            raise APIError(400, f"the prompt is {n_prompt} tokens; this server's context is {max_len} tokens "
                           "(prompt and completion together)", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        if chat and body.max_completion_tokens is not None:
            name, given = "max_completion_tokens", body.max_completion_tokens
        else:
            name, given = "max_tokens", body.max_tokens
        if given is None:
            max_tokens = room if chat else min(COMPLETIONS_MAX_TOKENS, room)
        elif given < 1:
            raise APIError(400, f"{name} must be at least 1, got {given}", param=name)
        elif given > room:
            raise APIError(400, f"{name} {given} + the prompt's {n_prompt} tokens exceed this server's context of "
                           f"{max_len} tokens", param=name, code="context_length_exceeded")
        else:
            max_tokens = given
        temperature = 1.0 if body.temperature is None else body.temperature
        if not 0 <= temperature <= 2:
            raise APIError(400, f"temperature must be in [0, 2], got {temperature}", param="temperature")
        top_p = 1.0 if body.top_p is None else body.top_p
        if not 0 < top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
        seed = None if body.seed is None else body.seed % SEED_MODULUS
        return SamplingParams(max_tokens, temperature, top_p, seed, body.ignore_eos)

    async def _generate(body: CompletionRequest | ChatRequest, request: Request, chat: bool):
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        bad = body.unsupported()
        if bad:
            raise APIError(400, f"{bad[0]} is not supported by this server (leave it at its default)", param=bad[0])
        stops = body.stop_list()
        prompt = _prompt(body, chat)
        params = _params(body, chat, len(prompt))
        try:
            rs = aengine.open(prompt, params)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry later", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        deadline = asyncio.get_running_loop().time() + request_timeout
        watcher = asyncio.create_task(_watch_disconnect(request, rs))
        shape = Shape(chat, model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(rs, watcher, shape, prompt, stops, deadline, include_usage, body.return_token_ids),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text, tokens, finish = [], [], None
            async with contextlib.aclosing(_pieces(rs, codec, prompt, stops, deadline)) as pieces:
                async for piece in pieces:
                    text.append(piece.text)
                    tokens.append(piece.token)
                    finish = piece.finish_reason
        except RequestTimeout:
            raise _timeout_error(request_timeout) from None
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; counted as the client's leaving
        finally:
            watcher.cancel()
            rs.abort()
        return shape.full("".join(text), finish, usage(len(prompt), len(tokens)),
                          tokens if body.return_token_ids else None)

    async def _sse(rs: RequestStream, watcher: asyncio.Task, shape: Shape, prompt: list[int], stops: list[str],
                   deadline: float, include_usage: bool, return_ids: bool) -> AsyncIterator[str]:
        n, pending = 0, []
        try:
            if shape.chat:
                yield _event(shape.chunk(None, None, role=True))
            async with contextlib.aclosing(_pieces(rs, codec, prompt, stops, deadline)) as pieces:
                async for piece in pieces:
                    n += 1
                    pending.append(piece.token)
                    if piece.text or piece.finish_reason:  # held-back text waits for the next chunk
                        yield _event(shape.chunk(piece.text, piece.finish_reason, pending if return_ids else None))
                        pending = []
            if include_usage:
                yield _event(shape.usage_chunk(usage(len(prompt), n)))
            yield "data: [DONE]\n\n"
        except RequestTimeout:
            yield _event(_timeout_error(request_timeout).body())
        except APIError as e:
            yield _event(e.body())
        except ClientGone:
            return
        finally:
            watcher.cancel()
            rs.abort()

    return app


def _timeout_error(seconds: float) -> APIError:
    return APIError(408, f"the request ran past the server's timeout of {seconds:g} s", "timeout_error",
                    code="timeout")


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _watch_disconnect(request: Request, rs: RequestStream) -> None:
    """Cancel the request's sequence when its client disconnects (the body has been read: the next message the
    server delivers is the disconnect, or the end of the response, after which the abort is a no-op)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            rs.abort()
            return


async def _pieces(rs: RequestStream, codec: TextCodec, prompt: list[int], stops: list[str],
                  deadline: float) -> AsyncIterator[Piece]:
    """The engine's events as text: incremental detokenization, stop strings (a hit ends the sequence, the stop
    string not included), errors as APIError (500), a cancellation as ClientGone."""
    detok = codec.detokenizer(prompt)
    matcher = StopMatcher(stops)
    async with contextlib.aclosing(rs.events(deadline)) as events:
        async for ev in events:
            if ev.error is not None:
                raise APIError(500, f"generation failed: {ev.error}", "server_error")
            if ev.token is None:  # cancelled without a token
                raise ClientGone
            text = detok.add(ev.token)
            if ev.finish_reason is not None:
                text += detok.flush()
            out, hit = matcher.feed(text)
            if hit:
                yield Piece(out, ev.token, "stop")
                return  # leaving the events() generator aborts the sequence
            if ev.finish_reason is not None:
                out += matcher.flush()
            yield Piece(out, ev.token, ev.finish_reason)


class ServerThread:
    """Serve ``app`` with uvicorn in a background thread on a loopback port (tests, notebooks, an in-process
    benchmark). A context manager: leaving it drains and stops the server, whatever happened inside."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0):
        self.app, self.host, self.port, self.start_timeout = app, host, port, start_timeout
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > self.start_timeout:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=120)
            if self.thread.is_alive():
                log.error("the server thread on %s did not stop", self.url)
                self.server.force_exit = True
                self.thread.join(timeout=30)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free port chosen by the system)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
