"""The one place that turns user-given device and dtype names into torch objects (CLI, demo, runtime)."""

from __future__ import annotations

import logging

import torch

from esparse.errors import EsparseError

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> fp16 | bf16 | fp32 (config.ini's and the algorithm cache's spelling)."""
    if dtype not in NAMES:
        raise EsparseError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
    return NAMES[dtype]


def parse_dtype(name: str | None) -> torch.dtype | None:
    """fp16 | bf16 | fp32 -> the torch dtype; None or "auto" -> None (the caller's default)."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise EsparseError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """None or "auto": the GPU when torch sees one, else the CPU; a CUDA device torch cannot see is refused."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EsparseError("--device cuda was asked for but torch sees no CUDA GPU: use --device cpu")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """``--threads``: how many CPU threads torch uses for its kernels. torch takes one per core; when other jobs
    share those cores its threads wait on each other, and fewer threads is faster (issue 19: 1 thread instead
    of 2 on a shared 2-core machine, 20 -> 6 s per perplexity window). None keeps torch's choice."""
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("torch uses %d CPU thread%s", threads, "" if threads == 1 else "s")
