"""Perplexity with the WikiText protocol (docs/method.md, "Perplexity"): one token stream, non-overlapping
windows, batch 1."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: str | torch.device = "cpu", desc: str = "ppl") -> float:
    """exp(mean next-token NLL over all predicted tokens of ``windows`` [n, seqlen])."""
    total, count = 0.0, 0
    for row in tqdm(windows, desc=desc, unit="window", leave=False):
        ids = row[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total += float(loss)
        count += ids.shape[1] - 1
    return math.exp(total / count)
