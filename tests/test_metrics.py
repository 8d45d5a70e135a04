"""Each metric against a direct numpy computation of its formula; masks and N:M checks."""

import numpy as np
import pytest
import torch

from esparse.converter.masks import is_nm_sparse, kept_score, nm_mask, parse_pattern
from esparse.converter.scores import MetricConfig, channel_factor, importance
from esparse.converter.stats import ChannelStats
from esparse.errors import EsparseError


def _stats(x: torch.Tensor, hist: bool = True, shared=False) -> ChannelStats:
    st = ChannelStats(x.shape[-1], "cpu", bins=16)
    for chunk in x.split(7):
        st.update(chunk)
    if hist:
        for chunk in x.split(5):
            st.update_hist(chunk, shared_range=shared)
    return st


def _np_hist_entropy(x: np.ndarray, bins: int, shared: bool) -> np.ndarray:
    out = []
    lo_all, hi_all = x.min(), x.max()
    for j in range(x.shape[1]):
        col = x[:, j].astype(np.float64)
        lo, hi = (lo_all, hi_all) if shared else (col.min(), col.max())
        if hi == lo and not shared:
            out.append(0.0)
            continue
        b = np.clip(np.floor((col - lo) / (hi - lo) * bins), 0, bins - 1).astype(int)
        p = np.bincount(b, minlength=bins) / len(col)
        p = p[p > 0]
        out.append(float(-(p * np.log(p)).sum()))
    return np.array(out)


def test_norm_and_entropies_match_numpy():
    torch.manual_seed(0)
    x = torch.randn(50, 6) * torch.tensor([1.0, 2.0, 0.1, 5.0, 1.0, 3.0])
    x[:, 4] = 1.5  # a constant channel has zero entropy
    st = _stats(x)
    xn = x.numpy().astype(np.float64)
    np.testing.assert_allclose(st.norm().numpy(), np.sqrt((xn**2).sum(0)), rtol=1e-6)
    np.testing.assert_allclose(st.entropy("hist").numpy(), _np_hist_entropy(xn, 16, False), rtol=1e-5, atol=1e-6)
    e = xn**2
    p = e / e.sum(0)
    energy = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(0)
    np.testing.assert_allclose(st.entropy("energy").numpy(), energy, rtol=1e-5)
    st_shared = _stats(x, shared=True)
    np.testing.assert_allclose(st_shared.entropy("hist_layer").numpy(), _np_hist_entropy(xn, 16, True), rtol=1e-5)


@pytest.mark.parametrize("method,alpha,combine", [
    ("magnitude", 0, "add"), ("wanda", 0, "add"), ("esparse", 0.5, "add"), ("esparse", 1.0, "mul"),
])
def test_scores_match_formula(method, alpha, combine):
    torch.manual_seed(1)
    x = torch.randn(40, 8) * torch.rand(8) * 3
    w = torch.randn(5, 8)
    st = _stats(x)
    cfg = MetricConfig(method, alpha, "hist", combine)
    s = importance(w, channel_factor(st, cfg) if cfg.needs_stats else None).numpy()
    wn, xn = np.abs(w.numpy().astype(np.float64)), x.numpy().astype(np.float64)
    n = np.sqrt((xn**2).sum(0))
    h = _np_hist_entropy(xn, 16, False)
    expected = {
        "magnitude": wn,
        "wanda": wn * n,
        "esparse": wn * (n / n.mean() + alpha * h / h.mean()) if combine == "add" else wn * n * h**alpha,
    }[method]
    np.testing.assert_allclose(s, expected, rtol=1e-5)


def test_esparse_alpha0_equals_wanda_masks():
    torch.manual_seed(2)
    x, w = torch.randn(30, 16), torch.randn(6, 16)
    st = _stats(x, hist=False)
    a = nm_mask(importance(w, channel_factor(st, MetricConfig("esparse", 0.0))), 2, 4)
    b = nm_mask(importance(w, channel_factor(st, MetricConfig("wanda"))), 2, 4)
    assert torch.equal(a, b)


def test_nm_mask_keeps_n_largest_per_group():
    torch.manual_seed(3)
    s = torch.rand(7, 24)
    for n, m in [(2, 4), (4, 8), (1, 3)]:
        mask = nm_mask(s, n, m)
        assert (mask.view(7, -1, m).sum(-1) == n).all()
        g = s.view(7, -1, m).numpy()
        kept = np.sort(g, -1)[..., ::-1][..., :n].sum()
        assert np.isclose((s * mask).sum().item(), kept, rtol=1e-6)
        assert np.isclose(kept_score(s, n, m).item(), kept, rtol=1e-6)
        assert is_nm_sparse(s * mask, n, m)
        assert not is_nm_sparse(s, n, m)


def test_nm_mask_ties_go_to_lower_index():
    mask = nm_mask(torch.ones(1, 4), 2, 4)
    assert mask.tolist() == [[True, True, False, False]]


def test_pattern_parsing_and_divisibility():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("4:8") == (4, 8)
    for bad in ("2-4", "4:2", "0:4", "a:b"):
        with pytest.raises(EsparseError):
            parse_pattern(bad)
    with pytest.raises(EsparseError, match="not divisible"):
        nm_mask(torch.rand(2, 10), 2, 4)
