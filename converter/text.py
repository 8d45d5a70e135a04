"""Reading text files and turning them into token windows for calibration and perplexity.

Calibration (docs/method.md, "Calibration"): ``nsamples`` random windows of ``seqlen`` tokens, seeded. We draw them
from one token stream made of all documents joined with blank lines, rather than from single documents
longer than seqlen as Wanda does with C4: the offline samples we have (C4 and Wikipedia excerpts from
exllamav3) hold few documents longer than 2048 tokens, and a boundary inside a window costs nothing.

Perplexity (docs/method.md): documents joined with "\\n\\n", tokenised once, non-overlapping windows, tail dropped.
``--eval-join rows`` (:func:`read_rows`) joins the file's rows as the Wanda/SparseGPT evaluation code joins the
WikiText-2 test split's rows instead, so that numbers can be set beside published ones.

Limits: a text file over :data:`MAX_TEXT_BYTES` is refused before it is read, and a text over
:data:`ONE_CALL_CHARS` is tokenised in chunks of about :data:`TOKENIZE_CHUNK_CHARS` characters of whole documents
(a fast tokenizer's peak memory is many times its input: one 200 MB string took 13.7 GB), so memory stays near the
text and its ids, and only as far as the use needs: calibration 16 tokens of text per token it samples (at least
2^21), perplexity with --max-windows the windows it evaluates. Texts up to ONE_CALL_CHARS, which covers WikiText-2
and the calibration samples, are tokenised whole in one call as before.
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
from pathlib import Path

import torch

from esparse.errors import EsparseError
from esparse.limits import check_fits

log = logging.getLogger(__name__)

MAX_TEXT_BYTES = 1 << 30  # 1 GiB: far more than calibration or WikiText needs
ONE_CALL_CHARS = 8 << 20  # up to 8 Mi characters: one tokenizer call (ids exactly as a single call gives them)
TOKENIZE_CHUNK_CHARS = 1 << 20  # beyond: calls of about 1 Mi characters each


EVAL_JOINS = ("documents", "rows")  # --eval-join: how an evaluation file becomes the one string that is tokenised


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, or one clear error (a folder, a missing file, a file over MAX_TEXT_BYTES)."""
    if not path.is_file():
        if path.is_dir():
            raise EsparseError(f"{path} is a folder: give one text file (plain text, <doc>-tagged or JSON lines)")
        raise EsparseError(f"text file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise EsparseError(f"text file {path} is {size / 2**30:.1f} GiB, over esparse's limit of "
                           f"{MAX_TEXT_BYTES / 2**30:.0f} GiB: give a smaller file (e.g. its first part: "
                           f"head -c 500M {path} > part.txt)")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EsparseError(f"cannot read {path} as UTF-8 text: {e}") from e


def _json_texts(path: Path, raw: str) -> list[str]:
    """The "text" field of every JSON line, as it is (empty strings included); blank lines are skipped."""
    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
            if not isinstance(text, str):
                raise TypeError(text)
            texts.append(text)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EsparseError(f"{path}:{i} is not a JSON object with a string \"text\" field") from e
    return texts


def _json_lines(path: Path, raw: str) -> bool:
    """JSON lines by name (.jsonl/.json), or when the first non-empty line is a JSON object with a "text" field
    (a plain text whose first line merely starts with "{" stays plain text)."""
    if path.suffix in (".jsonl", ".json"):
        return True
    first = next((line for line in raw.split("\n", 64) if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return False
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "text" in obj


_DOC_TAG = re.compile(r"<doc[^>]*>|</doc>")


def read_documents(path: str | Path) -> list[str]:
    """Documents of a text file: JSON lines with a "text" field, ``<doc>``-tagged text, or plain lines.

    Plain text gives one document per non-empty line (the WikiText-2 raw rows, C4 samples), without its line
    ending; CRLF is normalised to LF.
    """
    path = Path(path)
    raw = _read_text(path).replace("\r\n", "\n")
    if _json_lines(path, raw):
        docs = _json_texts(path, raw)
    elif "<doc" in raw:
        docs = [d.strip() for d in re.split(r"<doc[^>]*>", raw)]
        docs = [_DOC_TAG.sub("", d).strip() for d in docs]
    else:
        docs = [line for line in raw.split("\n") if line.strip()]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise EsparseError(f"text file {path} is empty")
    return docs


def read_rows(path: str | Path) -> list[str]:
    """The file as a dataset's rows, for ``--eval-join rows``: "\\n\\n".join(rows) is then the string that the
    Wanda and SparseGPT evaluation code builds from the WikiText-2 test split.

    Plain text: one row per line, its newline kept, a blank (whitespace-only) line as an empty row, which is
    how the datasets library's WikiText builder turns wiki.test.raw into rows. JSON lines: each "text" as it
    is, empty rows included (a JSON-lines export of the split's rows gives the published string exactly).
    """
    path = Path(path)
    raw = _read_text(path)
    if _json_lines(path, raw):
        rows = _json_texts(path, raw)
    else:
        lines = raw.split("\n")
        rows = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
        rows = [r if r.strip() else "" for r in rows]
    if not any(r.strip() for r in rows):
        raise EsparseError(f"text file {path} is empty")
    return rows


def read_eval_text(path: str | Path, join: str = "documents") -> list[str]:
    """What :func:`eval_windows` joins with "\\n\\n": the documents (``documents``: non-empty lines without
    their newline, as esparse's own tables use) or the rows (``rows``: the Wanda/SparseGPT WikiText-2 string)."""
    if join not in EVAL_JOINS:
        raise EsparseError(f"--eval-join {join}: use one of {', '.join(EVAL_JOINS)}")
    return read_rows(path) if join == "rows" else read_documents(path)


def _chunks(docs: list[str], size: int) -> list[list[str]]:
    """Consecutive runs of whole documents of about ``size`` characters each (a longer document alone)."""
    out: list[list[str]] = [[]]
    n = 0
    for d in docs:
        if out[-1] and n + len(d) > size:
            out.append([])
            n = 0
        out[-1].append(d)
        n += len(d) + 2
    return out


def _release_freed_memory() -> None:
    """Hand the freed buffers of a tokenizer call back to the system: glibc keeps them in its arenas, and across
    chunk after chunk the process grew by ~80 MB per 1 Mi characters though nothing was still in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def tokenize_stream(tokenizer, docs: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """All documents joined with "\\n\\n" and tokenised: a 1-D LongTensor. In one call up to ONE_CALL_CHARS
    characters; beyond, chunk by chunk of whole documents, each chunk after the first starting with its "\\n\\n"
    separator and without the tokenizer's special tokens (the ids at a chunk's start may differ from a single
    call's; memory stays bounded), stopping once ``max_tokens`` are in hand when it is given."""
    if sum(len(d) + 2 for d in docs) <= ONE_CALL_CHARS:
        return tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0].long()
    parts, count = [], 0
    for j, chunk in enumerate(_chunks(docs, TOKENIZE_CHUNK_CHARS)):
        if max_tokens is not None and count >= max_tokens:
            log.info("tokenised the first %d tokens of a long text (enough for its use here)", count)
            break
        text = "\n\n".join(chunk) if j == 0 else "\n\n" + "\n\n".join(chunk)
        ids = tokenizer(text, add_special_tokens=j == 0, return_attention_mask=False).input_ids
        parts.append(torch.tensor(ids, dtype=torch.int32))
        count += len(ids)
        del ids
        _release_freed_memory()
    return torch.cat(parts).long()


def calibration_windows(
    tokenizer, docs: list[str], nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``[nsamples, seqlen]`` random token windows from the joined documents, reproducible from ``seed``."""
    if nsamples < 1 or seqlen < 2:
        raise EsparseError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    # a long text (beyond one tokenizer call) is tokenised only as far as the windows can use: 16 tokens of text
    # for every token sampled, and at least 2^21
    stream = tokenize_stream(tokenizer, docs, max(16 * nsamples * seqlen, 1 << 21))
    if stream.numel() <= seqlen:
        raise EsparseError(
            f"calibration text is too short: {stream.numel()} tokens, a window needs {seqlen + 1}; "
            "give more text or a smaller --seqlen"
        )
    distinct = stream.numel() - seqlen
    if nsamples > distinct:
        raise EsparseError(f"--nsamples {nsamples} is more than the {distinct} distinct windows of {seqlen} tokens the "
                           f"calibration text ({stream.numel()} tokens) holds: lower --nsamples or give more text")
    check_fits(nsamples * seqlen * 8, "cpu", f"{nsamples} calibration windows of {seqlen} tokens",
               "lower --nsamples or --seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, distinct, (nsamples,), generator=gen)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, docs: list[str], seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """``[n, seqlen]`` consecutive non-overlapping windows (WikiText protocol); the tail is dropped."""
    stream = tokenize_stream(tokenizer, docs, None if max_windows is None else max_windows * seqlen)
    n = stream.numel() // seqlen
    if n == 0:
        raise EsparseError(f"evaluation text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seqlen].view(n, seqlen)
