"""SparseGPT N:M against a direct column-by-column computation, and on the sequential pipeline."""

import pytest
import torch

from esparse.converter.masks import is_nm_sparse
from esparse.converter.sparsegpt import damped_hessian, sparsegpt_nm_


def reference_obs_nm(w: torch.Tensor, h: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight OBS elimination, fp64, no Cholesky and no blocks: inverse Hessians by explicit Schur
    complements, every rank-1 update applied to all later columns at once."""
    w = w.double().clone()
    k = w.shape[1]
    hinv = torch.linalg.inv(h)
    rows, diag = [], []
    for j in range(k):  # the inverse Hessian seen by column j: columns < j eliminated
        rows.append(hinv[j].clone())
        diag.append(hinv[j, j].item())
        hinv = hinv - torch.outer(hinv[:, j], hinv[j]) / hinv[j, j]
    keep = torch.ones_like(w, dtype=torch.bool)
    for j in range(k):
        if j % m == 0:
            sal = torch.stack([w[:, c] ** 2 / diag[c] for c in range(j, j + m)], 1)
            keep[:, j : j + m].scatter_(1, sal.topk(m - n, dim=1, largest=False).indices, False)
        q = w[:, j] * keep[:, j]
        err = (w[:, j] - q) / diag[j]
        w[:, j:] -= err[:, None] * rows[j][None, j:]
        w[:, j] = q
    return w * keep, keep


@pytest.mark.parametrize("n,m,block", [(2, 4, 8), (2, 4, 64), (4, 8, 16), (1, 4, 12)])
def test_matches_direct_obs(n, m, block):
    g = torch.Generator().manual_seed(n * 100 + m + block)
    k = 48
    x = torch.randn(300, k, generator=g) * torch.rand(k, generator=g) * 3  # uneven channel scales
    x[:, 5] = 0  # a dead input channel
    w = torch.randn(24, k, generator=g)
    hess = x.double().t() @ x.double()
    wref = w.clone()
    href = damped_hessian(hess, wref, 0.01)
    want_w, want_keep = reference_obs_nm(wref, href, n, m)
    got = w.clone()
    keep = sparsegpt_nm_(got, hess, n, m, block=block, damp=0.01)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got.double(), want_w, rtol=1e-5, atol=1e-6)
    assert is_nm_sparse(got, n, m) and (got[:, 5] == 0).all()


def test_lowers_output_error_below_masking_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    w = torch.randn(32, 64, generator=g)
    got = w.clone()
    keep = sparsegpt_nm_(got, x.double().t() @ x.double(), 2, 4)
    err_sgpt = (x @ (w - got).t()).norm()
    err_mask = (x @ (w - w * keep).t()).norm()  # same mask, no update
    assert err_sgpt < 0.8 * err_mask


def test_pipeline_sparsegpt_prunes_24_and_refuses_shuffles(llama_dir, calib_file):
    from esparse.converter.model_io import load_model, load_tokenizer
    from esparse.converter.prune import PruneConfig, prune_model
    from esparse.converter.scores import MetricConfig
    from esparse.converter.text import calibration_windows, read_documents

    with pytest.raises(ValueError, match="gns=None"):
        PruneConfig(2, 4, MetricConfig("sparsegpt"), gns="serpentine")
    assert not PruneConfig(2, 4, MetricConfig("sparsegpt")).shuffles  # the preset: no shuffles
    model = load_model(llama_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_windows(load_tokenizer(llama_dir), read_documents(calib_file), 4, 32, seed=0)
    prune_model(model, calib, PruneConfig(2, 4, MetricConfig("sparsegpt"), gns=None, lbs=False))
    q = model.model.layers[0].self_attn.q_proj.weight
    assert is_nm_sparse(q, 2, 4)
    kept = q != 0
    assert not torch.allclose(q[kept], before["model.layers.0.self_attn.q_proj.weight"][kept])  # updated
