"""SparseGPT N:M pruning of one linear: the anchor that *updates* weights (E-Sparse, Wanda, magnitude do not).

The layer-wise problem: find a masked W' minimising ||W X - W' X||^2 over calibration inputs X, with
H = 2 X X^T / tokens. Columns are visited left to right; for column j the optimal brain surgeon update spreads
the error of removing w_j over the columns not yet visited, weighted by the inverse Hessian of those columns:

    err = (w_j - q_j) / Hinv_j[j, j]        W[:, j:] -= err (x) Hinv_j[j, j:]

where Hinv_j is the inverse Hessian after the columns before j were eliminated (a Schur complement of inv(H)).
Those rows are exactly the rows of the upper Cholesky factor U of inv(H), scaled by U[j, j], so one Cholesky
gives them all; columns are processed in blocks so that the update to later blocks is one matrix product.
At the first column of each group of M, the M-N weights with the smallest w^2 / Hinv_j[j, j] (the OBS saliency,
with the current, already-updated weights) are pruned. Dampening adds ``damp`` x mean(diag H) to the diagonal;
a column whose input is always zero has its weight zeroed and H[j, j] set to 1.
"""

from __future__ import annotations

import torch


def damped_hessian(h: torch.Tensor, weight: torch.Tensor, damp: float) -> torch.Tensor:
    """H with dead columns fixed (their weights zeroed in place) and dampening added, fp64 copy."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0
    h.diagonal().add_(damp * torch.diag(h).mean())
    return h


@torch.no_grad()
def sparsegpt_nm_(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, block: int = 128,
                  damp: float = 0.01) -> torch.Tensor:
    """Prune ``weight`` [rows, K] in place to keep ``n`` of every ``m`` along K, updating the kept weights.

    ``hessian`` [K, K] is X X^T summed over calibration tokens (any positive scale). Returns the keep mask.
    """
    rows, k = weight.shape
    if k % m or block % m:
        raise ValueError(f"SparseGPT {n}:{m}: K={k} and the block {block} must be multiples of {m}")
    w = weight.detach().double().clone()
    h = damped_hessian(hessian, w, damp)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, ub = w[:, b0:b1].clone(), hinv[b0:b1, b0:b1]
        errs = torch.zeros_like(wb)
        for j in range(b1 - b0):
            if j % m == 0:  # choose the group's pruned weights from the current (updated) weights
                sal = wb[:, j : j + m] ** 2 / torch.diag(ub)[j : j + m][None, :] ** 2
                drop = sal.topk(m - n, dim=1, largest=False).indices
                keep[:, b0 + j : b0 + j + m].scatter_(1, drop, False)
            col = wb[:, j]
            q = col * keep[:, b0 + j]
            err = (col - q) / ub[j, j]
            wb[:, j:] -= err[:, None] * ub[j, j:][None, :]
            wb[:, j] = q
            errs[:, j] = err
        w[:, b0:b1] = wb
        w[:, b1:] -= errs @ hinv[b0:b1, b1:]
    weight.copy_((w * keep).to(weight.dtype))
    return keep


def hessian_update(h: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Add the inputs x [..., K] of one batch to the running X X^T (fp64)."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    step = x2.t() @ x2
    return step if h is None else h.add_(step)
