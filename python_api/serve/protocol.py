"""The OpenAI wire format: request bodies (validated by pydantic), the error shape, response and chunk objects.

Supported: ``model``, ``prompt`` (one text, or one list of token ids), ``messages`` (text content, or text
parts), ``max_tokens`` (chat: also ``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop``,
``stream``, ``stream_options.include_usage``. Two extensions for load tests, sent as extra body fields:
``ignore_eos`` (generate exactly ``max_tokens``) and ``return_token_ids`` (each choice carries its generated ids
as ``token_ids``). Parameters whose other values this server does not implement (``n`` > 1, ``logprobs``,
penalties, ``echo``, ``best_of``, ``suffix``, ``logit_bias``) are refused with a 400 rather than ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

COMPLETIONS_MAX_TOKENS = 16  # the completions API's documented default when max_tokens is not given
MAX_STOPS = 4


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False

    def unsupported(self) -> list[str]:
        bad = []
        if self.n not in (None, 1):
            bad.append("n")
        if self.presence_penalty not in (None, 0):
            bad.append("presence_penalty")
        if self.frequency_penalty not in (None, 0):
            bad.append("frequency_penalty")
        if self.logit_bias:
            bad.append("logit_bias")
        return bad

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"stop takes at most {MAX_STOPS} sequences, got {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "a stop sequence is empty", param="stop")
        return stops


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        bad += [k for k in ("echo", "suffix", "logprobs") if getattr(self, k)]
        if self.best_of not in (None, 1):
            bad.append("best_of")
        return bad


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"message content of type {part.type!r} is not supported (text only)",
                               param="messages")
        return "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def unsupported(self) -> list[str]:
        return super().unsupported() + [k for k in ("logprobs", "top_logprobs") if getattr(self, k)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shape:
    """The objects of one response (completion or chat): the whole answer, its stream chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = self.object + (".chunk" if self.chat and chunk else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, use: dict, token_ids: list[int] | None) -> dict:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return {**self._head(False), "choices": [choice], "usage": use}

    def chunk(self, text: str | None, finish_reason: str | None, token_ids: list[int] | None = None,
              role: bool = False) -> dict:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return {**self._head(True), "choices": [choice], "usage": None}

    def usage_chunk(self, use: dict) -> dict:
        return {**self._head(True), "choices": [], "usage": use}
