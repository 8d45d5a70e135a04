"""Mask refinement without weight updates: swap kept and pruned weights inside N:M groups to lower the
linear's output error on the calibration inputs (docs/method.md, "Mask refinement").

For one row w of a linear and its mask, the pruned part r = w * (1 - mask) changes the output on input x by
r . x, so the squared output error summed over the calibration tokens is L = r^T H r with H = sum_t x_t x_t^T
(the same X X^T SparseGPT uses). Swapping a kept j for a pruned l of the same group (r gains w_j at j and
loses w_l at l) changes L by

    delta = 2 (w_j g_j - w_l g_l) + w_j^2 H_jj + w_l^2 H_ll - 2 w_j w_l H_jl,   g = H r.

Each iteration takes, for every row at once, the swap with the most negative delta anywhere in the row and
updates g in O(K); rows are independent, so L never increases for any row and the N:M pattern is kept. The
kept weights are never changed: the result is still a pure mask on the original weights.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def refine_nm_mask(weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, m: int, iters: int,
                   damp: float = 0.0, row_chunk: int = 1024) -> tuple[torch.Tensor, float]:
    """Refined copy of ``mask`` [R, K] (bool, N of every M kept along K) for ``weight`` [R, K] and the input
    Gram matrix ``hessian`` [K, K], after at most ``iters`` swaps per row. ``damp`` adds that fraction of
    mean(diag H) to the diagonal (a Gram matrix from few calibration tokens is noisy: damping pulls the
    objective toward the per-channel error). Returns (mask, fraction of the (damped) output error removed:
    1 - L_after / L_before summed over rows). One function: the swap search is a single batched loop whose
    state (residual, gains per candidate) would only be passed around if split."""
    r_all, k = weight.shape
    n = int(mask[0, :m].sum())  # kept per group (the same in every group of an N:M mask)
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    h = hessian.to(device=weight.device, dtype=dt)
    if damp:
        h = h + damp * h.diagonal().mean() * torch.eye(k, device=h.device, dtype=dt)
    hd = h.diagonal().view(k // m, m)
    gi = torch.arange(k // m, device=h.device)
    hb = h.view(k // m, m, k // m, m)[gi, :, gi, :]  # [G, M, M]: H inside each group
    out = mask.clone()
    before = after = 0.0
    for s in range(0, r_all, row_chunk):
        w = weight[s:s + row_chunk].to(dt)
        mk = out[s:s + row_chunk]
        res = w * (~mk)
        g = res @ h  # H r per row (H symmetric)
        before += float((res * g).sum())
        rows = torch.arange(w.shape[0], device=w.device)
        wg = w.view(-1, k // m, m)
        quad = wg.square() * hd  # w_j^2 H_jj
        cross = -2 * wg[..., :, None] * wg[..., None, :] * hb  # -2 w_j w_l H_jl: fixed, the weights never change
        for _ in range(iters):
            lin = 2 * wg * g.view(-1, k // m, m)
            # only (kept j, pruned l) pairs of a group can swap: gather them, n * (m - n) per group
            order = mk.view(-1, k // m, m).to(torch.int8).argsort(dim=-1, descending=True, stable=True)
            kj, pl = order[..., :n], order[..., n:]
            pair = (kj[..., :, None] * m + pl[..., None, :]).flatten(-2)  # [rows, G, n (m-n)] into m*m
            delta = ((lin + quad).gather(-1, kj)[..., :, None] + (quad - lin).gather(-1, pl)[..., None, :]).flatten(-2)
            delta = (delta + cross.flatten(-2).gather(-1, pair)).view(w.shape[0], -1)
            best, idx = delta.min(dim=1)
            go = best < -1e-12 * (res * g).sum(1).abs().clamp_min(1e-30)
            if not bool(go.any()):
                break
            grp = idx // pair.shape[-1]
            code = pair.view(w.shape[0], -1).gather(1, idx[:, None]).squeeze(1)  # j * m + l inside the group
            drop, keep = grp * m + code // m, grp * m + code % m  # kept j to prune, pruned l to keep
            rr, drop, keep = rows[go], drop[go], keep[go]
            wj, wl = w[rr, drop], w[rr, keep]
            mk[rr, drop] = False
            mk[rr, keep] = True
            res[rr, drop] = wj
            res[rr, keep] = 0
            g[rr] += wj[:, None] * h[drop] - wl[:, None] * h[keep]
        after += float((res * (res @ h)).sum())
    return out, (1.0 - after / before) if before > 0 else 0.0
