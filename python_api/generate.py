"""Text generation on the runtime: batched prompts (one cache row each), greedy or temperature/top-p sampling,
decode steps optionally replayed from CUDA graphs captured once per batch size (Transformer.graph_step)."""

from __future__ import annotations

import torch

from .model import Transformer


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    sorted_p, idx = probs.sort(-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p
    sorted_p = sorted_p.masked_fill(drop, 0)
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
    return idx.gather(-1, choice)[:, 0]


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, seed: int = 0,
             cuda_graph: bool = False) -> list[list[int]]:
    """New tokens for each prompt (stops a sequence at ``eos_id``).

    Each prompt is prefilled into its own cache row (no padding: a row's positions are its slots), then all
    rows decode together, each at its own position."""
    b = len(prompts)
    longest = max(len(p) for p in prompts)
    dev = model.device
    use_graph = cuda_graph and dev.type == "cuda"
    if use_graph:  # graphs and their caches are kept per (batch, length bucket) and reused across calls
        cache, step = model.graph_step(b, longest + max_new_tokens)
    else:
        cache, step = model.new_cache(b, longest + max_new_tokens), None
    logits = torch.cat([model(torch.tensor([p], device=dev), cache.rows(i, i + 1), 0)[:, -1]
                        for i, p in enumerate(prompts)])
    start = torch.tensor([len(p) for p in prompts], device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
    out = torch.empty(b, max_new_tokens, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    for j in range(max_new_tokens):
        nxt = sample(logits, temperature, top_p, gen)
        out[:, j] = nxt
        if eos_id is not None:
            done |= nxt == eos_id
            if j % 16 == 15 and bool(done.all()):
                out = out[:, : j + 1]
                break
        if j == max_new_tokens - 1:
            break
        logits = (step(nxt[:, None], start) if step is not None else model(nxt[:, None], cache, start))[:, -1]
        start = start + 1
    result = []
    for row in out.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        result.append(row)
    return result
