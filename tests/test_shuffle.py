"""Channel shuffles: valid permutations, exact swap gains, never below no-shuffle."""

import itertools

import pytest
import torch

from esparse.converter.masks import kept_score
from esparse.converter.shuffle import (
    _rep_rows,
    _slot_terms,
    global_naive_shuffle,
    kept_total,
    local_block_shuffle,
    shuffle,
)


def _scores(b, r, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, r, k, generator=g) * torch.exp(torch.randn(b, 1, k, generator=g))


def test_gns_deals_one_channel_per_tier_serpentine():
    s = torch.arange(16, dtype=torch.float32).flip(0)[None, None, :].repeat(1, 2, 1)  # channel j has rank j
    perm = global_naive_shuffle(s, 4)[0]
    groups = perm.view(4, 4)  # G = 4 groups of M = 4
    assert sorted(perm.tolist()) == list(range(16))
    for g in range(4):
        assert [int(c) // 4 for c in groups[g]] == [0, 1, 2, 3]  # one channel of each tier
    assert groups[0].tolist() == [0, 7, 8, 15] and groups[3].tolist() == [3, 4, 11, 12]


def test_rep_table_matches_brute_force_swap_gain():
    torch.manual_seed(0)
    n, m, r, bk = 2, 4, 5, 8
    x = torch.rand(1, r, bk)
    cur = x.view(1, r, 2, 4)
    t, o, kept = _slot_terms(cur, n, m)
    rep = _rep_rows(x, t.reshape(1, r, bk), o.reshape(1, r, bk), 4)[0]
    base = kept_score(x[0], n, m).item()
    for a, c in itertools.product(range(4), range(4, 8)):
        p = list(range(bk))
        p[a], p[c] = p[c], p[a]
        actual = kept_score(x[0][:, p], n, m).item() - base
        predicted = (rep[a, c] + rep[c, a] - kept[0, 0] - kept[0, 1]).item()
        assert abs(actual - predicted) < 1e-5


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_lbs_raises_kept_score_and_stays_a_permutation(n, m):
    s = _scores(2, 24, 128, seed=n)
    start = global_naive_shuffle(s, m)
    perm = local_block_shuffle(s, start, n, m, block=32, iters=50)
    for b in range(2):
        assert sorted(perm[b].tolist()) == list(range(128))
    assert kept_total(s, perm, n, m) > kept_total(s, start, n, m)


@pytest.mark.parametrize("seed", range(5))
def test_shuffle_never_lowers_kept_score_vs_no_shuffle(seed):
    s = _scores(1, 16, 64, seed)
    ident = torch.arange(64)[None]
    for gns, lbs in [("serpentine", True), ("round_robin", True), (None, True), ("serpentine", False)]:
        perm, frac = shuffle(s, 2, 4, gns=gns, lbs=lbs, block=64, iters=100)
        assert kept_total(s, perm, 2, 4) >= kept_total(s, ident, 2, 4) - 1e-9
        assert frac["final"] >= frac["identity"] - 1e-12


def test_lbs_is_optimal_for_single_swaps_at_convergence():
    s = _scores(1, 6, 16, seed=7)
    perm = local_block_shuffle(s, torch.arange(16)[None], 2, 4, block=16, iters=200)
    best = kept_total(s, perm, 2, 4)
    p = perm[0].tolist()
    for a, c in itertools.combinations(range(16), 2):
        if a // 4 == c // 4:
            continue
        q = list(p)
        q[a], q[c] = q[c], q[a]
        assert kept_total(s, torch.tensor([q]), 2, 4) <= best + 1e-6
