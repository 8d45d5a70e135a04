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
    gs, q = k // m, m - n  # groups per row; pruned per group
    npair = n * q  # (kept, pruned) pairs per group
    gi = torch.arange(gs, device=h.device)
    hb = h.view(gs, m, gs, m)[gi, :, gi, :].permute(1, 2, 0)  # [M, M, G]: H inside each group
    # Work in position-major channel order (channel grp*m + pos at pos*G + grp): every per-group quantity is then
    # [rows, slot, G] with G contiguous, so the per-iteration arithmetic runs over long rows instead of groups of
    # M (several times faster on a CPU); the mask is mapped back at the end.
    pm = torch.arange(k, device=h.device).view(gs, m).t().flatten()
    h = h[pm][:, pm]
    hd = h.diagonal().view(m, gs)
    out = mask.clone()
    before = after = 0.0
    for s in range(0, r_all, row_chunk):
        w = weight[s:s + row_chunk].to(dt)[:, pm]
        mk = out[s:s + row_chunk][:, pm]
        rows = torch.arange(w.shape[0], device=w.device)
        res = w * (~mk)
        g = res @ h  # H r per row (H symmetric)
        before += float((res * g).sum())  # summed as ``after`` is, so that no swap means a gain of exactly 0
        loss = (res * g).sum(1)  # per row, kept current by adding each swap's delta
        wv = w.view(-1, m, gs)
        quad = wv.square() * hd  # w_j^2 H_jj
        # -2 w_j w_l H_jl for every (j, l) of a group: fixed, the weights never change
        cross = (-2 * wv[:, :, None, :] * wv[:, None, :, :] * hb).view(-1, m * m, gs)
        # the (kept j, pruned l) positions of each group: found once, then updated by each swap (which exchanges
        # one kept and one pruned position of one group), so no iteration sorts
        order = mk.view(-1, m, gs).to(torch.int8).argsort(dim=1, descending=True, stable=True)
        kj, pl = order[:, :n].contiguous(), order[:, n:].contiguous()  # [rows, n, G], [rows, m - n, G]
        quad_k, quad_p = quad.gather(1, kj), quad.gather(1, pl)
        cross_p = cross.gather(1, (kj[:, :, None] * m + pl[:, None, :]).view(-1, npair, gs))  # [rows, P, G]
        for _ in range(iters):
            lin = 2 * wv * g.view(-1, m, gs)
            delta = (lin.gather(1, kj) + quad_k)[:, :, None] + (quad_p - lin.gather(1, pl))[:, None, :]
            delta = (delta.view(-1, npair, gs) + cross_p).view(w.shape[0], -1)
            best, idx = delta.min(dim=1)
            go = best < -1e-12 * loss.abs().clamp_min(1e-30)
            if not bool(go.any()):
                break
            rr, idx = rows[go], idx[go]
            grp, pi = idx % gs, idx // gs
            a, b = pi // q, pi % q  # slot in kj of the kept j to prune, in pl of the pruned l to keep
            jpos, lpos = kj[rr, a, grp], pl[rr, b, grp]
            drop, keep = jpos * gs + grp, lpos * gs + grp
            wj, wl = w[rr, drop], w[rr, keep]
            mk[rr, drop] = False
            mk[rr, keep] = True
            res[rr, drop] = wj
            res[rr, keep] = 0
            g.index_add_(0, rr, wj[:, None] * h[drop] - wl[:, None] * h[keep])
            loss[rr] += best[go]
            kj[rr, a, grp], pl[rr, b, grp] = lpos, jpos
            quad_k[rr, a, grp], quad_p[rr, b, grp] = quad[rr, lpos, grp], quad[rr, jpos, grp]
            pr = (kj[rr, :, grp][:, :, None] * m + pl[rr, :, grp][:, None, :]).view(-1, npair)
            cross_p[rr, :, grp] = cross[rr, :, grp].gather(1, pr)
        after += float((res * (res @ h)).sum())
        out[s:s + row_chunk, pm] = mk
    return out, (1.0 - after / before) if before > 0 else 0.0
