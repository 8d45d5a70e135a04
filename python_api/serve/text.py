"""The text side of serving: prompts to token ids (plain or through the chat template), generated ids back to
text one token at a time, stop strings, and which ids end a sequence.

Kept apart from the engine, which sees only token ids, so that a model without a tokenizer (random weights of a
benchmark shape) is served all the same: its clients send token ids and read ids back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

CONTEXT_TOKENS = 6  # prompt ids decoded beside the first new ones, so a leading space or merge comes out right


class TextCodec:
    """A tokenizer (or none) and the ids that end a sequence."""

    def __init__(self, tokenizer=None, eos_ids: set[int] | None = None):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids or ())

    @classmethod
    def from_folder(cls, folder: Path | None, end_id: int | None = None) -> TextCodec:
        """The exported tokenizer in ``folder`` (None: no tokenizer). EOS ids: the tokenizer's, those of
        generation_config.json (a chat model often ends turns with its own token), and config.ini's end_id."""
        eos: set[int] = set() if end_id is None else {end_id}
        if folder is None:
            return cls(None, eos)
        from esparse.converter.model_io import load_tokenizer

        tok = load_tokenizer(folder)
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        gen = Path(folder) / "generation_config.json"
        if gen.is_file():
            try:
                value = json.loads(gen.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError):
                log.warning("ignoring %s: not a JSON object", gen)
                value = None
            eos.update(int(v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
        return cls(tok, eos)

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer is not None

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer is not None and bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model was served without a tokenizer: send the prompt as a list of token ids")
        return list(self.tokenizer(text).input_ids)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation rendered by the exported chat template, with the assistant's turn opened."""
        if not self.has_chat_template:
            raise ValueError("the exported tokenizer has no chat template: use /v1/completions")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)  # the template wrote its specials

    def detokenizer(self, prompt: list[int]) -> Detokenizer:
        return Detokenizer(self.tokenizer, prompt)


class Detokenizer:
    """Generated ids to text as they come. Decoding one id alone is wrong for many tokenizers (a byte of a
    multi-byte character, a word-initial space that depends on the previous token), so each step decodes a short
    window that starts at the last point where text was emitted and emits only what the new id added; a window
    that ends inside a character (U+FFFD) waits for the next id. Without a tokenizer each id is its own text,
    `` <id>``."""

    def __init__(self, tokenizer, prompt: list[int]):
        self.tok = tokenizer
        self.ids = list(prompt[-CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        if self.tok is None:
            return f" {token}"
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Text still held at the end (an incomplete character is emitted as it is)."""
        if self.tok is None or self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class StopMatcher:
    """Stop strings over streamed text. Text that could be the start of a stop string is held back until it
    either completes one (the output ends before it, the stop string itself not included) or cannot."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to emit now, whether a stop string was found)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
