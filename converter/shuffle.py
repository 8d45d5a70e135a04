"""Channel shuffles that spread information-rich channels over different N:M groups (docs/method.md, "Shuffles").

Both work on a batch of score matrices ``S[b]`` of shape [R, K] (R = stacked rows of every linear sharing
one input; b = one matrix per kv head for the attention output, else 1) and return permutations P [B, K]:
serving position q holds original channel P[q].

* Global naive shuffle (GNS): sort channels by column score sum, deal them out serpentine so every group
  of M holds one channel of each importance tier. O(K log K).
* Local block shuffle (LBS): inside blocks of ``block`` consecutive serving positions, greedily apply the
  single best channel swap between two groups, up to ``iters`` times, maximising the kept score
  F = sum_rows sum_groups topN(group). Swap gains come from a replacement table
  Rep[slot, c] = sum_r T_slot[r] + sum_r relu(S[r, c] - o_slot[r]), where T_slot is the top-N sum of the
  slot's M-1 group mates and o_slot their N-th largest value (exact because M-1 >= N). After a swap only
  the 2M rows of the two touched groups change, so each iteration costs O(R * 2M * block) per block.
  All blocks of all matrices run batched; no Python loop over channel pairs.
"""

from __future__ import annotations

import torch

from esparse.errors import EsparseError

from .masks import kept_score


def kept_total(s: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> float:
    """F for a batch: sum over b of kept_score(S[b][:, P[b]])."""
    return float(sum(kept_score(s[b][:, perm[b]], n, m) for b in range(s.shape[0])))


def global_naive_shuffle(s: torch.Tensor, m: int, mode: str = "serpentine") -> torch.Tensor:
    """GNS permutation [B, K] for scores [B, R, K]."""
    bsz, _, k = s.shape
    g = k // m
    order = torch.sort(s.sum(1, dtype=torch.float64), dim=1, descending=True, stable=True).indices
    r = torch.arange(k, device=s.device)
    tier, q = r // g, r % g
    if mode == "serpentine":
        group = torch.where(tier % 2 == 0, q, g - 1 - q)
    elif mode == "round_robin":
        group = q
    else:
        raise ValueError(f"unknown GNS mode {mode!r}; use serpentine or round_robin")
    dest = group * m + tier  # serving position of the channel of rank r
    perm = torch.empty_like(order)
    perm[:, dest] = order
    return perm


def _block_size(k: int, m: int, block: int) -> int:
    """Largest multiple of m that divides k and is at most ``block`` (64 divides all LLaMA/OPT widths)."""
    for b in range(min(block, k) // m * m, 0, -m):
        if k % b == 0:
            return b
    return m


def _slot_terms(cur: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For arrangement ``cur`` [nb, R, G, M]: (T [nb,R,G,M], o [nb,R,G,M], kept [nb,G])."""
    vals = torch.sort(cur, dim=-1, descending=True).values
    top = vals[..., :n].sum(-1, keepdim=True)
    in_top = cur >= vals[..., n - 1 : n]
    t = torch.where(in_top, top - cur + vals[..., n : n + 1], top.expand_as(cur))
    o = torch.where(in_top, vals[..., n : n + 1], vals[..., n - 1 : n]).expand_as(cur)
    kept = top.squeeze(-1).sum(1, dtype=torch.float64)
    return t, o, kept


def _rep_rows(x: torch.Tensor, t: torch.Tensor, o: torch.Tensor, chunk: int) -> torch.Tensor:
    """Rep[b, slot, c] for the given slots: x [nb,R,Bk] (by channel), t/o [nb,R,S] -> [nb,S,Bk] fp64."""
    nb, r, bk = x.shape
    rep = t.double().sum(1)[:, :, None].expand(nb, t.shape[2], bk).clone()
    for r0 in range(0, r, chunk):
        xs, os_ = x[:, r0 : r0 + chunk], o[:, r0 : r0 + chunk]
        rep += torch.relu(xs[:, :, None, :] - os_[:, :, :, None]).sum(1).double()
    return rep


def local_block_shuffle(
    s: torch.Tensor,
    perm: torch.Tensor,
    n: int,
    m: int,
    block: int = 64,
    iters: int = 100,
    mem_budget: int = 1 << 28,
) -> torch.Tensor:
    """Refine ``perm`` [B, K] by greedy best swaps inside blocks; never lowers F. One function because it is one
    vectorised loop over the algorithm's state (scores of every candidate swap, kept in memory budget chunks)."""
    bsz, r, k = s.shape
    bk = _block_size(k, m, block)
    nblk, g = k // bk, bk // m
    serv = torch.gather(s.float(), 2, perm[:, None, :].expand(bsz, r, k))
    x = serv.view(bsz, r, nblk, bk).permute(0, 2, 1, 3).reshape(bsz * nblk, r, bk).contiguous()
    nb = x.shape[0]
    dev = x.device
    pos2ch = torch.arange(bk, device=dev).repeat(nb, 1)  # slot -> block-local channel
    chunk = max(1, mem_budget // (4 * nb * bk * bk))
    group_of_slot = torch.arange(bk, device=dev) // m
    bidx = torch.arange(nb, device=dev)

    def arrangement() -> torch.Tensor:
        return torch.gather(x, 2, pos2ch[:, None, :].expand(nb, r, bk)).view(nb, r, g, m)

    t, o, kept = _slot_terms(arrangement(), n, m)
    rep = _rep_rows(x, t.reshape(nb, r, bk), o.reshape(nb, r, bk), chunk)  # [nb, slot, channel]
    active = torch.ones(nb, dtype=torch.bool, device=dev)
    for _ in range(iters):
        ch2pos = torch.argsort(pos2ch, dim=1)
        rep_c = torch.gather(rep, 1, ch2pos[:, :, None].expand(nb, bk, bk))  # rows by channel
        gch = group_of_slot[ch2pos]  # [nb, Bk] group of each channel
        kept_c = torch.gather(kept, 1, gch)
        delta = rep_c + rep_c.transpose(1, 2) - kept_c[:, :, None] - kept_c[:, None, :]
        delta.masked_fill_(gch[:, :, None] == gch[:, None, :], -torch.inf)
        best, flat = delta.view(nb, -1).max(1)
        active &= best > 1e-9 * kept.sum(1).abs()
        if not bool(active.any()):
            break
        a, c = flat // bk, flat % bk
        pa, pc = ch2pos[bidx, a], ch2pos[bidx, c]
        new = pos2ch.clone()
        new[bidx, pa], new[bidx, pc] = c, a
        pos2ch = torch.where(active[:, None], new, pos2ch)
        t, o, kept = _slot_terms(arrangement(), n, m)
        # only blocks that just swapped need their 2M touched Rep rows recomputed
        act = active.nonzero()[:, 0]
        ga, gc = group_of_slot[pa[act]], group_of_slot[pc[act]]
        offs = torch.arange(m, device=dev)
        slots = torch.cat([ga[:, None] * m + offs, gc[:, None] * m + offs], 1)  # [na, 2M]
        na = act.numel()
        t_s = torch.gather(t.reshape(nb, r, bk)[act], 2, slots[:, None, :].expand(na, r, 2 * m))
        o_s = torch.gather(o.reshape(nb, r, bk)[act], 2, slots[:, None, :].expand(na, r, 2 * m))
        rows = _rep_rows(x[act], t_s, o_s, chunk)
        rep[act] = rep[act].scatter(1, slots[:, :, None].expand(na, 2 * m, bk), rows)
    local = pos2ch.view(bsz, nblk, bk) + (torch.arange(nblk, device=dev) * bk)[None, :, None]
    return torch.gather(perm, 1, local.reshape(bsz, k))


def shuffle(
    s: torch.Tensor,
    n: int,
    m: int,
    gns: str | None = "serpentine",
    lbs: bool = True,
    block: int = 64,
    iters: int = 100,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GNS (optional) then LBS (optional) on scores [B, R, K]; returns (P [B, K], kept fractions).

    GNS alone can lower F (it does on random matrices). The result is never worse than no shuffle: if
    GNS+LBS ends below the identity's F, LBS is also run from the identity and the better one is kept.
    """
    bsz, _, k = s.shape
    if k % m:  # the attention output shuffles each head's channels: head_dim must hold whole groups
        raise EsparseError(f"the channel shuffle permutes blocks of {k} channels (for the attention output: one "
                           f"head), not divisible by M={m}: choose a pattern whose M divides {k}, or --no-shuffle")
    ident = torch.arange(k, device=s.device).repeat(bsz, 1)
    total = float(s.sum(dtype=torch.float64))
    f_id = kept_total(s, ident, n, m)
    perm = global_naive_shuffle(s, m, gns) if gns else ident
    f_gns = kept_total(s, perm, n, m)
    if lbs:
        perm = local_block_shuffle(s, perm, n, m, block, iters)
    f = kept_total(s, perm, n, m)
    if f < f_id:
        alt = local_block_shuffle(s, ident, n, m, block, iters) if lbs else ident
        f_alt = kept_total(s, alt, n, m)
        if f_alt > f:
            perm, f = alt, f_alt
    denom = max(total, 1e-30)
    return perm, {"identity": f_id / denom, "gns": f_gns / denom, "final": f / denom}
