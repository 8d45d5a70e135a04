"""One rank of the tensor-parallel tests (tests/test_tp.py), started by torchrun or by the test itself with
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set. Errors end it as the CLI does: one ``esparse: error:`` line, code 2.

``check OUT FOLDER...``: for each exported tp=2 folder, the logits of a batched prefill and of decode steps
(one start per row), through the model and through the serving API (TPModel on rank 0, follow on the others,
with an idle pause longer than the serving group's timeout that only the keep-alive bridges), and the
vocabulary-split head on a vocabulary the ranks do not divide; rank 0 saves them to OUT (torch.save).

``loop FOLDER PIDDIR``: rank 0 drives decode steps through TPModel until it is stopped, the others follow; each
rank writes PIDDIR/<rank>.pid once the first step ran (the test then kills one of them).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from esparse.errors import EsparseError
from esparse.python_api import distributed as D

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 8, 9, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32]])
SERVE_TIMEOUT_S = 2.0


def model_logits(model) -> dict[str, torch.Tensor]:
    """Prefill of the batch's first 8 tokens (all positions), then 4 decode steps with one start per row."""
    out = {}
    cache = model.new_cache(2, 16)
    out["prefill"] = model(IDS[:, :8], cache, 0, all_logits=True)
    for j in range(8, 12):
        out[f"decode{j}"] = model(IDS[:, j : j + 1], cache, torch.tensor([j, j]))
    return out


def serve_logits(engine, idle_s: float = 0.0) -> dict[str, torch.Tensor]:
    """The same requests as a serving engine makes them (``engine``: a TPModel, or a Transformer for the
    reference): each row prefilled alone (rows of the cache), rows of different lengths decoded together, and an
    idle pause of ``idle_s`` between requests."""
    out = {}
    cache = engine.new_cache(2, 16)
    out["row0"] = engine(IDS[:1, :8], cache.rows(0, 1), 0)
    out["row1"] = engine(IDS[1:, :5], cache.rows(1, 2), 0)
    time.sleep(idle_s)  # longer than the serving group's timeout: only the keep-alive keeps the followers waiting
    start = torch.tensor([8, 5])
    for j in range(3):
        ids = torch.stack([IDS[0, 8 + j], IDS[1, 5 + j]])[:, None]
        out[f"step{j}"] = engine(ids, cache, start + j)
    if hasattr(engine, "free_cache"):
        engine.free_cache(cache)
    return out


def head_check(tp: D.TPSession) -> dict[str, torch.Tensor]:
    """The vocabulary-split head on a vocabulary of 7 over the ranks (the last block padded) against F.linear."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(7, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    head = D.VocabParallelHead(16, 7, tp.size, tp.group)
    lo, hi, per = D.head_rows(7, tp.size, tp.rank)
    head.weight.data = torch.cat([w[lo:hi], torch.zeros(per - (hi - lo), 16)])
    return {"head": head(x), "head_ref": torch.nn.functional.linear(x, w)}


def short_session(tp: D.TPSession, timeout_s: float) -> D.TPSession:
    """A group of the same ranks with a short timeout, made once the ranks are in step (loading and joining
    keep the long one: a loaded machine may start one rank seconds after the other)."""
    return D.TPSession(tp.rank, tp.size, tp.device, dist.new_group(timeout=timedelta(seconds=timeout_s)), timeout_s)


def check(tp: D.TPSession, out: Path, folders: list[str]) -> None:
    results = {"heads": head_check(tp)}
    serve = short_session(tp, SERVE_TIMEOUT_S)
    for i, folder in enumerate(folders):
        model = tp.agree(lambda f=folder: D.load_shard(f, tp, torch.float32), "loading")
        res = model_logits(model)
        if tp.rank == 0:
            with D.TPModel(model, serve) as engine:
                res.update(serve_logits(engine, 1.5 * SERVE_TIMEOUT_S if i == 0 else 0.0))
        else:
            D.follow(model, serve)
        results[folder] = res
    if tp.rank == 0:
        torch.save(results, out)


def loop(tp: D.TPSession, folder: str, piddir: Path) -> None:
    """Steps until a rank is lost; the model's collectives and the steps' broadcasts on a group with TP_TIMEOUT."""
    fast = short_session(tp, float(os.environ.get("TP_TIMEOUT", "60")))
    model = tp.agree(lambda: D.load_shard(folder, fast, torch.float32), "loading")
    tp = fast
    if tp.rank != 0:
        (piddir / f"{tp.rank}.pid").write_text(str(os.getpid()))
        D.follow(model, tp)
        return
    engine = D.TPModel(model, tp)
    cache = engine.new_cache(2, 16)
    engine(IDS[:, :8], cache, 0)
    (piddir / "0.pid").write_text(str(os.getpid()))
    for j in range(10**9):
        engine(IDS[:, 8:9], cache, torch.tensor([8 + j % 7, 8 + j % 7]))


def main(argv: list[str]) -> int:
    mode, *rest = argv
    try:
        with D.session(2, "cpu", 120.0) as tp:
            if mode == "check":
                check(tp, Path(rest[0]), rest[1:])
            else:
                loop(tp, rest[0], Path(rest[1]))
    except EsparseError as e:
        print(f"esparse: error: {e}", file=sys.stderr)
        D.end_rank_process(2)
        return 2
    D.end_rank_process(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
