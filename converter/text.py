"""Reading text files and turning them into token windows for calibration and perplexity.

Calibration (docs/method.md, "Calibration"): ``nsamples`` random windows of ``seqlen`` tokens, seeded. We draw them
from one token stream made of all documents joined with blank lines, rather than from single documents
longer than seqlen as Wanda does with C4: the offline samples we have (C4 and Wikipedia excerpts from
exllamav3) hold few documents longer than 2048 tokens, and a boundary inside a window costs nothing.

Perplexity (docs/method.md): documents joined with "\\n\\n", tokenised once, non-overlapping windows, tail dropped.
``--eval-join rows`` (:func:`read_rows`) joins the file's rows as the Wanda/SparseGPT evaluation code joins the
WikiText-2 test split's rows instead, so that numbers can be set beside published ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from esparse.errors import EsparseError

_DOC_TAG = re.compile(r"<doc[^>]*>|</doc>")


EVAL_JOINS = ("documents", "rows")  # --eval-join: how an evaluation file becomes the one string that is tokenised


def _read_text(path: Path) -> str:
    """The file as UTF-8 text with universal newlines (CRLF and CR read as LF), or one clear error."""
    if not path.is_file():
        if path.is_dir():
            raise EsparseError(f"{path} is a folder: give one text file (plain text, <doc>-tagged or JSON lines)")
        raise EsparseError(f"text file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EsparseError(f"cannot read {path} as UTF-8 text: {e}") from e


def _is_json_lines(path: Path, raw: str) -> bool:
    return path.suffix in (".jsonl", ".json") or raw.lstrip().startswith("{")


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


def read_documents(path: str | Path) -> list[str]:
    """Documents of a text file: JSON lines with a "text" field, ``<doc>``-tagged text, or plain lines.

    Plain text gives one document per non-empty line (the WikiText-2 raw rows, C4 samples), without its line
    ending; CRLF is normalised to LF.
    """
    path = Path(path)
    raw = _read_text(path).replace("\r\n", "\n")
    if _is_json_lines(path, raw):
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
    if _is_json_lines(path, raw):
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


def tokenize_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents joined with "\\n\\n" and tokenised once: a 1-D LongTensor."""
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    return ids.long()


def calibration_windows(
    tokenizer, docs: list[str], nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``[nsamples, seqlen]`` random token windows from the joined documents, reproducible from ``seed``."""
    if nsamples < 1 or seqlen < 2:
        raise EsparseError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    stream = tokenize_stream(tokenizer, docs)
    if stream.numel() <= seqlen:
        raise EsparseError(
            f"calibration text is too short: {stream.numel()} tokens, a window needs {seqlen + 1}; "
            "give more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, docs: list[str], seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """``[n, seqlen]`` consecutive non-overlapping windows (WikiText protocol); the tail is dropped."""
    stream = tokenize_stream(tokenizer, docs)
    n = stream.numel() // seqlen
    if n == 0:
        raise EsparseError(f"evaluation text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seqlen].view(n, seqlen)
