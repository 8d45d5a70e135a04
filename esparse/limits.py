"""Resource limits checked before allocation: a request that cannot fit is one ``esparse: error:`` line that
says how much it needs, how much there is and what to change, never a multi-minute swap storm, an
out-of-memory kill or a hang.

Memory is what the device reports free now: ``torch.cuda.mem_get_info`` on a GPU; on the CPU the kernel's
MemAvailable, lowered to the cgroup's remaining limit when the process runs inside one (a container).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from esparse.errors import EsparseError

TP_TIMEOUT_S = 600.0  # a collective may wait this long for a slower rank (a large shard still loading)

GIB = 1 << 30


def _cgroup_room() -> int | None:
    """Bytes the cgroup (v2) still lets this process allocate, or None when there is no limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def free_memory(device: torch.device | str) -> int:
    """Bytes free for new tensors on ``device`` now."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 1 << 62  # cannot tell: do not refuse
    room = _cgroup_room()
    return free if room is None else min(free, room)


def human(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB / 10 else f"{nbytes / (1 << 20):.1f} MiB"


def check_fits(nbytes: int, device: torch.device | str, what: str, fix: str) -> None:
    """Refuse, before allocating, ``nbytes`` that ``device`` does not have free."""
    free = free_memory(device)
    if nbytes > free:
        raise EsparseError(f"{what} need {human(nbytes)}, and {torch.device(device)} has {human(free)} free: {fix}")


def check_calibration_fits(config, nsamples: int, seqlen: int, device: torch.device | str,
                           dtype: torch.dtype) -> None:
    """Pruning keeps every calibration window's hidden states of the layer being pruned, inputs and outputs
    (2 x nsamples x seqlen x hidden values) on the pruning device: refuse a sample count that cannot fit."""
    device = torch.device(device)
    act_dtype = torch.float32 if device.type == "cpu" else dtype
    need = 2 * nsamples * seqlen * int(config.hidden_size) * torch.tensor([], dtype=act_dtype).element_size()
    check_fits(need, device, f"the calibration activations of --nsamples {nsamples} x --seqlen {seqlen} (hidden size "
               f"{config.hidden_size})", "lower --nsamples or --seqlen")


def check_kv_cache_fits(cfg, batch: int, length: int, device: torch.device | str, dtype: torch.dtype) -> None:
    """The runtime's KV cache ([layers, batch, kv_heads, length, head_dim], keys and values) must fit."""
    if length > cfg.max_pos:
        raise EsparseError(f"{length} tokens (prompt + --max-new-tokens) exceed the model's {cfg.max_pos} positions: "
                           "shorten the prompt or lower --max-new-tokens")
    need = 2 * cfg.n_layers * batch * cfg.n_kv * length * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()
    check_fits(need, device, f"the KV cache of {batch} x {length} tokens would", "lower --max-new-tokens, shorten "
               "the prompts or pass fewer of them")
