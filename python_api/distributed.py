"""Tensor parallelism on torch.distributed: one model over ``tp`` processes (NCCL on GPUs, gloo on the CPU).

Launched by ``torchrun --nproc-per-node N`` (one process per GPU), each rank reads only its own shard of the
``<N>-gpu/`` export (esparse/format/ft_shard.py) and holds a tp=1 model of its shard's sizes:

* qkv and w1 (gate|up or fc1) are column-parallel: the rank's heads (query and key/value heads alike; GQA kv
  heads are split, never replicated, so tp must divide them) and its slice of intermediate channels. Attention
  and the MLP's activation need nothing from other ranks, and each rank's KV cache holds its own kv heads.
* wo and w2 are row-parallel: each rank multiplies its slice of input channels, and the partial outputs are
  summed over ranks by an all-reduce (a forward hook on the block's attention and feed_forward, whose output is
  wo's and w2's; the hooks survive the linear swaps of python_api/linear.py). One all-reduce per half-block, as
  in Megatron-LM's layout. Row-parallel biases are carried by rank 0 only, so they are added once.
* Sparse or dense per rank: the export splits inputs only on whole N:M groups, so every shard is a 2:4 weight
  of its own width and goes to the same GEMM backends as an unsplit one.
* The token (and OPT's position) embeddings are replicated: a lookup reads only the batch's rows, so splitting
  them would save memory (vocab x hidden per rank) but add an all-reduce of [batch, tokens, hidden] to every
  step's critical path.
* The output projection (lm_head) is split by vocabulary, ceil(vocab / tp) rows per rank (the last padded with
  zero rows), and its logits are all-gathered: decode is bound by reading weights, and a replicated head would
  be read in full by every rank each step (vocab x hidden: 2% of LLaMA-7B's weights, but at tp=8 about 14% of
  what each rank reads). The gather also leaves bitwise the same logits on every rank, so every rank
  samples the same token with the same seed and the ranks cannot drift apart.

Failures: every collective has the session's timeout (gloo raises when it passes; NCCL's watchdog aborts the
process). A collective that fails on the CPU path (a peer died: the socket closes at once; or it stopped
answering within the timeout) becomes one ``esparse: error: rank R: ...`` line on every surviving rank, and
errors while loading are gathered so that rank 0 reports every failing rank's cause in one line and the others
exit quietly. Under torchrun, a rank that exits also makes torchrun stop the others.

Serving (:class:`TPModel` / :func:`follow`): rank 0 owns HTTP and the scheduler and calls the model through
:class:`TPModel`, which broadcasts each call (cache creation, the batch's token ids and positions) before
running it; the other ranks replay the calls in :func:`follow` until rank 0 closes the session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from esparse.errors import EsparseError
from esparse.format.ft_shard import FTShard, head_rows
from esparse.limits import TP_TIMEOUT_S

from .loader import build_decoder, default_backend
from .model import KVCache, Transformer

log = logging.getLogger(__name__)

T = TypeVar("T")


class ReportedByRank0(SystemExit):
    """A failure rank 0 reports for every rank: the other ranks exit with code 2 without printing it again."""

    def __init__(self) -> None:
        super().__init__(2)


@dataclass
class TPSession:
    """This process's place in a tensor-parallel run: rank, ranks, device and the process group."""

    rank: int
    size: int
    device: torch.device
    group: dist.ProcessGroup
    timeout_s: float
    owns_group: bool = False  # this session initialized torch.distributed (and so leaves it at close)

    def agree(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every rank, then agree on the outcome: if any rank failed, rank 0 raises one
        :class:`EsparseError` naming each failing rank and its cause and the others raise
        :class:`ReportedByRank0`, instead of the healthy ranks waiting in the next collective."""
        result, err = None, None
        try:
            result = fn()
        except EsparseError as e:
            err = str(e)
        except Exception as e:  # a bug on one rank must still stop the others; its traceback is logged here
            log.exception("rank %d: %s failed", self.rank, what)
            err = f"{type(e).__name__}: {_first_line(e)} (traceback in rank {self.rank}'s log)"
        errors: list[str | None] = [None] * self.size
        try:
            dist.all_gather_object(errors, err, group=self.group)
        except RuntimeError as e:
            raise lost_ranks(self.rank, f"check after {what}", e) from e
        if not any(errors):
            return result
        if self.rank != 0:
            raise ReportedByRank0()
        by_cause: dict[str, list[int]] = {}
        for r, m in enumerate(errors):
            if m:
                by_cause.setdefault(m, []).append(r)
        raise EsparseError("; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {m}"
                                     for m, rs in by_cause.items()))

    def close(self, clean: bool = True) -> None:
        """Leave the process group: after a barrier, so that no rank closes its connections while another is
        still inside the last collective. After a failure only the process exit tears it down (destroying a
        NCCL group whose peer is gone can block)."""
        if not (self.owns_group and dist.is_initialized()):
            return
        if not clean:
            if dist.get_backend(self.group) == "gloo":
                # Destroyed here, the group's threads are joined; left to the interpreter's exit, a gloo thread
                # can still be running when its C++ object dies, and the process aborts instead of exiting 2.
                dist.destroy_process_group()
            return
        try:
            dist.barrier(group=self.group)
        except RuntimeError as e:
            raise lost_ranks(self.rank, "barrier at the end", e) from e
        dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    if not text.isdigit():
        raise EsparseError(f"{name}={text!r} is not a number: launch with torchrun, which sets it, or unset it")
    return int(text)


def launched_ranks() -> int:
    """How many processes the launcher started (torchrun's WORLD_SIZE; 1 when not launched by it)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def _check_launch(tp: int | None, world: int, device: str | None) -> str:
    """The checks every rank makes alike (so rank 0 alone reports them); returns "cuda" or "cpu"."""
    if tp is not None and tp != world:
        raise EsparseError(f"torchrun started {world} processes but --tp is {tp}: launch with --nproc-per-node {tp} "
                           f"or pass --tp {world}")
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise EsparseError(f"--device {device} with --tp: each rank takes cuda:<LOCAL_RANK>; pass --device cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise EsparseError("--device cuda was asked for but torch sees no CUDA GPU: use --device cpu")
    return device


def _device_of_rank(kind: str, rank: int) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    local = _env_int("LOCAL_RANK", rank)
    if local >= torch.cuda.device_count():
        raise EsparseError(f"rank {rank} has LOCAL_RANK {local} but this host shows {torch.cuda.device_count()} GPUs: "
                           "start at most one process per GPU (torchrun --nproc-per-node)")
    return torch.device("cuda", local)


def start(tp: int | None, device: str | None, timeout_s: float = TP_TIMEOUT_S) -> TPSession | None:
    """Join the ranks torchrun started (its RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL on
    cuda:<LOCAL_RANK>, gloo on the CPU, ``timeout_s`` for joining and for every collective. None when the
    process was not started as one of several ranks (``--tp N`` then merges the shards on one device)."""
    world = launched_ranks()
    if world == 1:
        return None
    rank = _env_int("RANK", 0)
    try:
        kind = _check_launch(tp, world, device)
    except EsparseError:
        if rank != 0:
            raise ReportedByRank0() from None
        raise
    dev = _device_of_rank(kind, rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_initialized():  # joined already (a server that set up its ranks first): that world, its timeout
        return TPSession(dist.get_rank(), dist.get_world_size(), dev, dist.group.WORLD, timeout_s)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    except (RuntimeError, ValueError) as e:  # DistStoreError/DistNetworkError are RuntimeErrors
        raise EsparseError(f"rank {rank}: the {world} ranks did not all join within {timeout_s:g} s "
                           f"({_first_line(e)}): check that every rank started (torchrun --nproc-per-node {world}) "
                           "and that MASTER_ADDR/MASTER_PORT reach rank 0") from e
    log.debug("rank %d of %d on %s (%s)", rank, world, dev, backend)
    global _RANK_PROCESS
    _RANK_PROCESS = True
    return TPSession(rank, world, dev, dist.group.WORLD, timeout_s, owns_group=True)


_RANK_PROCESS = False  # this process joined a group of ranks (start())


def end_rank_process(code: int) -> None:
    """End a rank's process now with ``code`` (nothing when this process never joined ranks).

    The model's layers keep the process group alive past :meth:`TPSession.close`, so gloo's C++ worker threads
    would be destroyed during the interpreter's finalization, where they abort the process (SIGABRT, "terminate
    called without an active exception") about once in twenty runs, turning a clean exit 0 or a reported exit 2
    into a crash. By the time a command returns, every file is closed and every temporary folder removed: only
    the output streams and the log need flushing."""
    if not _RANK_PROCESS:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def session(tp: int | None, device: str | None, timeout_s: float = TP_TIMEOUT_S) -> Iterator[TPSession | None]:
    """:func:`start`, and the process group left at the end (cleanly only when the body succeeded)."""
    s = start(tp, device, timeout_s)
    if s is None:
        yield None
        return
    ok = False
    try:
        yield s
        ok = True
    finally:
        s.close(clean=ok)


def _first_line(e: BaseException) -> str:
    """A backend error's gist: its first sentence without the C++ source location gloo puts in front."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])
    return text.split(". ")[0].rstrip(".")


def lost_ranks(rank: int, where: str, e: BaseException) -> EsparseError:
    return EsparseError(f"rank {rank}: the {where} failed ({_first_line(e)}): another rank failed, was killed or "
                        "stopped answering within --tp-timeout; see that rank's error")


def _rank(group: dist.ProcessGroup) -> int:
    return dist.get_rank(group)


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup, where: str) -> torch.Tensor:
    """``t`` summed over the ranks of ``group`` (in place when eager; a traceable functional collective inside
    torch.compile, where a failure surfaces as NCCL's watchdog timeout instead)."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(t, "sum", group)
    try:
        dist.all_reduce(t, group=group)
    except RuntimeError as e:
        raise lost_ranks(_rank(group), where, e) from e
    return t


class AllReduceOutput:
    """Forward hook summing a module's output over ranks (after a row-parallel linear)."""

    def __init__(self, group: dist.ProcessGroup, where: str):
        self.group, self.where = group, where

    def __call__(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(out, self.group, self.where)


class VocabParallelHead(nn.Module):
    """The output projection split by vocabulary: this rank's ``per`` rows, logits all-gathered to [.., vocab]."""

    def __init__(self, hidden: int, vocab: int, tp: int, group: dist.ProcessGroup):
        super().__init__()
        self.per = head_rows(vocab, tp, 0)[2]
        self.weight = nn.Parameter(torch.empty(self.per, hidden), requires_grad=False)
        self.vocab, self.tp, self.group = vocab, tp, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if torch.compiler.is_compiling():
            from torch.distributed import _functional_collectives as funcol

            return funcol.all_gather_tensor(y, y.dim() - 1, self.group)[..., : self.vocab]
        parts = [torch.empty_like(y) for _ in range(self.tp)]
        try:
            dist.all_gather(parts, y.contiguous(), group=self.group)
        except RuntimeError as e:
            raise lost_ranks(_rank(self.group), "all-gather of the logits", e) from e
        return torch.cat(parts, -1)[..., : self.vocab]


def shard_model(model: Transformer, vocab: int, tp: int, group: dist.ProcessGroup) -> None:
    """Make a declared (meta) tp=1 model of one rank's sizes a rank of the tensor-parallel model: its head
    split by vocabulary, an all-reduce after every attention output and MLP output."""
    with torch.device("meta"):
        model.output = VocabParallelHead(model.cfg.hidden, vocab, tp, group)
    for i, block in enumerate(model.layers):
        block.attention.register_forward_hook(AllReduceOutput(group, f"all-reduce after layer {i}'s attention"))
        block.feed_forward.register_forward_hook(AllReduceOutput(group, f"all-reduce after layer {i}'s MLP"))


class ShardSource(FTShard):
    """This rank's shard as the loader's weight source, which also makes the declared model a rank's."""

    def __init__(self, path: Path, tp: TPSession):
        super().__init__(Path(path), tp.size, tp.rank)
        self.session = tp

    def prepare_model(self, model: Transformer) -> None:
        shard_model(model, self.full_cfg.vocab, self.session.size, self.session.group)


def load_shard(path: str | Path, tp: TPSession, dtype: torch.dtype, sparse: bool = False,
               backend: str | None = None) -> Transformer:
    """This rank's part of the model of exported folder ``path`` (its ``<tp>-gpu`` export) on the rank's
    device. Call it on every rank (inside :meth:`TPSession.agree`, so one rank's bad shard stops them all)."""
    src = ShardSource(Path(path), tp)
    if sparse and src.cfg.nm != (2, 4):
        raise EsparseError(f"{path} is {src.cfg.sparsity or 'dense'}: the sparse path serves 2:4 models; use --dense")
    be = backend or default_backend(tp.device, sparse)
    model = build_decoder(src, tp.device, dtype, be)
    log.info("loaded rank %d/%d of %s (%s, %d layers) on %s with %s linears", tp.rank, tp.size, src.folder,
             src.cfg.arch, src.cfg.n_layers, tp.device, be)
    return model


# --- serving: rank 0 drives, the others replay -------------------------------------------------------------

OP_NOOP, OP_NEW_CACHE, OP_FORWARD, OP_FREE_CACHE, OP_STOP = range(5)
HEADER = 10  # op and up to 9 integer fields, one broadcast


class TPModel:
    """Rank 0's handle on a tensor-parallel model for a serving engine: the Transformer calls the engine makes
    (``new_cache``, ``model(ids, cache, start)``, with ``cache.rows(lo, hi)`` views for one sequence's prefill),
    each broadcast to the other ranks first, which replay it in :func:`follow`.

    While rank 0 is idle (no request), a keep-alive broadcast every ``timeout_s / 4`` keeps the other ranks'
    wait from timing out; a broadcast that fails (another rank died) is kept in ``failure``, raised by the
    next call and handed to ``on_failure`` (e.g. to stop the HTTP server)."""

    def __init__(self, model: Transformer, tp: TPSession, keepalive: bool = True,
                 on_failure: Callable[[EsparseError], None] | None = None):
        if tp.rank != 0:
            raise ValueError("TPModel runs on rank 0; the other ranks call follow()")
        self.model, self.session, self.on_failure = model, tp, on_failure
        self.failure: EsparseError | None = None
        self._caches: dict[int, KVCache] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if keepalive:
            self._thread = threading.Thread(target=self._keepalive, name="esparse-tp-keepalive", daemon=True)
            self._thread.start()

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _send(self, op: int, fields: list[int], tensors: tuple[torch.Tensor, ...] = ()) -> None:
        """Broadcast one call (lock held)."""
        if self.failure is not None:
            raise self.failure
        header = torch.tensor([op, *fields] + [0] * (HEADER - 1 - len(fields)), dtype=torch.long,
                              device=self.session.device)
        try:
            dist.broadcast(header, 0, group=self.session.group)
            for t in tensors:
                dist.broadcast(t, 0, group=self.session.group)
        except RuntimeError as e:
            self.failure = lost_ranks(0, "broadcast of a step to the other ranks", e)
            raise self.failure from e
        self._last = time.monotonic()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache of ``batch`` rows on every rank (rank 0's is returned)."""
        with self._lock:
            cache = self.model.new_cache(batch, max_len)  # refused here first, before the others are told
            cid, self._next_id = self._next_id, self._next_id + 1
            self._send(OP_NEW_CACHE, [cid, batch, max_len])
            self._caches[cid] = cache
            return cache

    def free_cache(self, cache: KVCache) -> None:
        """Drop a cache made by :meth:`new_cache` on every rank."""
        with self._lock:
            cid, _, _ = self._locate(cache)
            self._send(OP_FREE_CACHE, [cid])
            del self._caches[cid]

    def _locate(self, cache: KVCache) -> tuple[int, int, int]:
        """(cache id, first row, last row + 1) of ``cache``: one made by :meth:`new_cache` or its rows()."""
        k = cache.k
        for cid, base in self._caches.items():
            if k.untyped_storage().data_ptr() != base.k.untyped_storage().data_ptr():
                continue
            off = k.storage_offset() - base.k.storage_offset()
            lo = off // base.k.stride(1)
            if (off % base.k.stride(1) or k.stride() != base.k.stride() or k.shape[0] != base.k.shape[0]
                    or k.shape[2:] != base.k.shape[2:] or lo < 0 or lo + k.shape[1] > base.batch):
                break
            return cid, lo, lo + k.shape[1]
        raise EsparseError("this cache is not one TPModel.new_cache made (or its cache.rows(lo, hi)): the other "
                           "ranks do not hold it")

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: KVCache, start: int | torch.Tensor,
                 all_logits: bool = False) -> torch.Tensor:
        """``Transformer.__call__`` on every rank: the same arguments, the same logits (on rank 0)."""
        dev = self.session.device
        ids = ids.to(device=dev, dtype=torch.long).contiguous()
        b, t = ids.shape
        with self._lock:
            cid, lo, hi = self._locate(cache)
            if isinstance(start, int):
                self._send(OP_FORWARD, [cid, lo, hi, b, t, start, 0, int(all_logits)], (ids,))
            else:
                start = start.to(device=dev, dtype=torch.long).contiguous()
                self._send(OP_FORWARD, [cid, lo, hi, b, t, -1, start.numel(), int(all_logits)], (ids, start))
            out = self.model(ids, cache, start, all_logits)
            self._last = time.monotonic()
            return out

    def _keepalive(self) -> None:
        every = self.session.timeout_s / 4
        if self.session.device.type == "cuda":
            torch.cuda.set_device(self.session.device)
        while not self._stop.wait(every / 2):
            if time.monotonic() - self._last < every or not self._lock.acquire(blocking=False):
                continue
            try:
                self._send(OP_NOOP, [])
            except EsparseError as e:
                log.error("%s", e)
                if self.on_failure is not None:
                    self.on_failure(e)
                return
            finally:
                self._lock.release()

    def close(self) -> None:
        """Stop the keep-alive and release the other ranks from :func:`follow`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.failure is None:
                self._send(OP_STOP, [])

    def __enter__(self) -> TPModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def follow(model: Transformer, tp: TPSession) -> None:
    """On ranks other than 0: replay rank 0's :class:`TPModel` calls on this rank's shard until it closes.
    Raises one clear :class:`EsparseError` when rank 0 is lost (or nothing, not even a keep-alive, arrives
    within the timeout)."""
    dev, group = tp.device, tp.group
    caches: dict[int, KVCache] = {}
    header = torch.empty(HEADER, dtype=torch.long, device=dev)

    def recv(t: torch.Tensor) -> torch.Tensor:
        try:
            dist.broadcast(t, 0, group=group)
        except RuntimeError as e:
            raise lost_ranks(tp.rank, "wait for rank 0's next step", e) from e
        return t

    while True:
        op, *f = recv(header).tolist()
        if op == OP_NOOP:
            continue
        if op == OP_STOP:
            return
        if op == OP_NEW_CACHE:
            caches[f[0]] = model.new_cache(f[1], f[2])
        elif op == OP_FREE_CACHE:
            caches.pop(f[0], None)
        elif op == OP_FORWARD:
            cid, lo, hi, b, t, start, n_start, all_logits = f[:8]
            ids = recv(torch.empty(b, t, dtype=torch.long, device=dev))
            if start < 0:
                start = recv(torch.empty(n_start, dtype=torch.long, device=dev))
            model(ids, caches[cid].rows(lo, hi), start, bool(all_logits))
        else:
            raise EsparseError(f"rank {tp.rank}: rank 0 sent an unknown step ({op}): every rank must run the same "
                               "esparse version")


def run_bench(args, tp: TPSession) -> str | None:
    """``esparse bench`` on one rank of a tensor-parallel run: every rank measures its part of the same calls
    (the collectives keep them in step); rank 0 writes bench.json/bench.png and returns the report to print,
    the others None."""
    from esparse.report import environment

    from .bench import bench_models, write_outputs
    from .timing import read_bandwidth

    if args.shape is not None or args.model is None:
        raise EsparseError("--shape with --tp: random weights are not sharded; export a model with --tp "
                           f"{tp.size} and bench its folder")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if tp.device.type == "cpu" and set(backends) - {"torch"}:
        raise EsparseError("no CUDA GPU: the dense/sparse plugin backends need one; use --backends torch for a "
                           "CPU smoke run")
    dtype = torch.float16 if tp.device.type == "cuda" else torch.float32
    src = tp.agree(lambda: ShardSource(Path(args.model), tp), "reading the shard")
    torch.manual_seed(0)  # the same random prompts on every rank
    meta = {**environment(), "model": str(args.model), "tp": tp.size, "prompt_len": args.prompt_len,
            "decode_steps": args.decode_steps, "dtype": str(dtype), "compiled": not args.no_compile,
            "cuda_graph": not args.no_cuda_graph}
    if tp.device.type == "cuda":
        meta["read_bandwidth_Bps"] = read_bandwidth(tp.device)
    results = bench_models(src, backends, tp.device, dtype, args.prompt_len, args.batches, args.decode_steps,
                           not args.no_cuda_graph, meta["compiled"])
    if tp.rank != 0:
        return None
    table = write_outputs(results, args.batches, meta, args.out)
    return (f"{meta['model']} over {tp.size} ranks (rank 0 on {tp.device}, {meta['dtype']}), prompt "
            f"{args.prompt_len}, {args.decode_steps} decode steps\n{table}\nwrote {args.out}/bench.json and bench.png")
