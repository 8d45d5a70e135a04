"""Perplexity with the WikiText protocol (docs/method.md, "Perplexity"): one token stream, non-overlapping
windows, batch 1."""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: str | torch.device = "cpu", desc: str = "ppl",
               log_every_s: float | None = None) -> float:
    """exp(mean next-token NLL over all predicted tokens of ``windows`` [n, seqlen]).

    The bar shows the perplexity so far. ``log_every_s``: also log a line (window i/n, perplexity so far,
    seconds per window) at most this often, for runs whose stderr is a log file rather than a terminal; a window
    can take many seconds on a shared CPU, and a silent run looks hung."""
    total, count = 0.0, 0
    n = windows.shape[0]
    t0 = last = time.perf_counter()
    bar = tqdm(windows, desc=desc, unit="window", leave=False)
    for i, row in enumerate(bar, 1):
        ids = row[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total += float(loss)
        count += ids.shape[1] - 1
        bar.set_postfix_str(f"ppl {math.exp(total / count):.3f}", refresh=False)
        now = time.perf_counter()
        if log_every_s is not None and now - last >= log_every_s:
            log.info("%s: window %d/%d, perplexity so far %.3f, %.1f s/window", desc, i, n,
                     math.exp(total / count), (now - t0) / i)
            last = now
    return math.exp(total / count)
