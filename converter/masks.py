"""N:M masks: in every row, each run of M consecutive input channels keeps its N highest scores."""

from __future__ import annotations

import torch

from esparse.errors import EsparseError
from esparse.format.ft_format import parse_nm


def parse_pattern(text: str) -> tuple[int, int]:
    """"2:4" -> (2, 4): keep N of every M (not Wanda's "prune N of M"); the format's rule (ft_format.parse_nm)."""
    nm = parse_nm(text, "pattern") if text not in ("", "dense") else None
    if nm is None:
        raise EsparseError(f"pattern {text!r} is not N:M (e.g. 2:4 or 4:8)")
    return nm


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask [R, K] keeping the N largest of each group of M columns; ties go to the lower index."""
    r, k = scores.shape
    if k % m:
        raise EsparseError(f"input dim {k} is not divisible by M={m}: this layer cannot be {n}:{m} sparse")
    groups = scores.reshape(r, k // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.view(r, k)


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of M consecutive entries along the last dim has at most N non-zeros."""
    k = weight.shape[-1]
    if k % m:
        return False
    nnz = (weight.reshape(-1, k // m, m) != 0).sum(-1)
    return bool((nnz <= n).all())


def kept_score(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Sum over rows and groups of the N largest scores of each group (the objective F), fp64."""
    r, k = scores.shape
    return scores.reshape(r, k // m, m).topk(n, dim=-1).values.sum(dtype=torch.float64)
