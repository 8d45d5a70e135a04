"""Mask refinement (converter/refine.py): N:M kept, weights untouched, output error never up, and the
reported gain is the real one, checked by direct computation on fresh random inputs."""

import pytest
import torch

from esparse.converter.masks import is_nm_sparse, nm_mask
from esparse.converter.refine import refine_nm_mask


def _err(w, mask, x):
    """Squared output error of the masked weight, per row: || (w - w*mask) x ||^2 over the tokens."""
    return ((w * ~mask) @ x.t()).square().sum(1)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_refinement_lowers_every_rows_error_and_keeps_nm(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    r, k, t = 24, 64, 200
    w = torch.randn(r, k, generator=g, dtype=torch.float64)
    # correlated inputs with uneven channel scales: where |W|*||x|| and the output error disagree
    x = torch.randn(t, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    x = x * torch.exp(torch.randn(k, generator=g, dtype=torch.float64))
    h = x.t() @ x
    start = nm_mask(w.abs() * x.norm(dim=0), n, m)  # Wanda's mask
    refined, gain = refine_nm_mask(w, start, h, m, iters=200, row_chunk=7)
    assert is_nm_sparse(w * refined, n, m) and bool((refined.view(r, -1, m).sum(-1) == n).all())
    before, after = _err(w, start, x), _err(w, refined, x)
    assert bool((after <= before * (1 + 1e-9)).all())
    assert after.sum() < 0.9 * before.sum()  # correlated inputs leave real room
    assert gain == pytest.approx(1 - float(after.sum() / before.sum()), rel=1e-4)
    assert bool(start.any()) and not torch.equal(start, refined)


def test_no_iterations_is_the_identity():
    w = torch.randn(4, 16)
    mask = nm_mask(w.abs(), 2, 4)
    out, gain = refine_nm_mask(w, mask, torch.eye(16), 4, iters=0)
    assert torch.equal(out, mask) and gain == 0.0


def test_identity_gram_is_already_optimal_for_magnitude():
    # with H = I the error is the sum of squared pruned weights: magnitude's mask is optimal, nothing moves
    w = torch.randn(6, 32, dtype=torch.float64)
    mask = nm_mask(w.abs(), 2, 4)
    out, gain = refine_nm_mask(w, mask, torch.eye(32, dtype=torch.float64), 4, iters=50)
    assert torch.equal(out, mask) and gain == pytest.approx(0.0, abs=1e-12)


def test_damping_moves_the_objective_toward_the_per_channel_error():
    # with a huge damping the damped Gram is ~ c * I: the refinement then keeps each group's largest |w|
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 32, generator=g, dtype=torch.float64)
    x = torch.randn(50, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g, dtype=torch.float64)
    start = nm_mask(torch.rand(8, 32, generator=g, dtype=torch.float64), 2, 4)  # a poor random mask
    out, gain = refine_nm_mask(w, start, x.t() @ x, 4, iters=100, damp=1e6)
    assert torch.equal(out, nm_mask(w.abs(), 2, 4)) and gain > 0
