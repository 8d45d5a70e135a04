"""Importance scores (higher = keep) for magnitude, Wanda and E-Sparse (docs/method.md, "Scores").

E-Sparse enriches Wanda's |W|*n with each input channel's information entropy. Additive form, scale-free
across layers: xi_ij = |W_ij| * (n_j/mean(n) + alpha * H_j/mean(H)); at alpha = 0 it is Wanda up to one
positive constant per input, so the masks are Wanda's exactly. ``combine="mul"`` gives |W| * n * H^alpha.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .defaults import ESPARSE_DEFAULTS
from .stats import ChannelStats

METHODS = ("magnitude", "wanda", "esparse", "sparsegpt")


@dataclass(frozen=True)
class MetricConfig:
    """Defaults are E-Sparse's as chosen in docs/method.md (converter/defaults.py)."""

    method: str = "esparse"
    alpha: float = ESPARSE_DEFAULTS["alpha"]
    estimator: str = ESPARSE_DEFAULTS["estimator"]  # hist | hist_layer | energy
    combine: str = ESPARSE_DEFAULTS["combine"]  # add | mul

    @property
    def needs_stats(self) -> bool:
        return self.method not in ("magnitude", "sparsegpt")

    @property
    def updates_weights(self) -> bool:
        """SparseGPT changes the kept weights (the reference every table shows); the others only mask."""
        return self.method == "sparsegpt"

    @property
    def needs_energy(self) -> bool:
        return self.method == "esparse" and self.alpha != 0 and self.estimator == "energy"

    @property
    def needs_hist(self) -> bool:
        return self.method == "esparse" and self.alpha != 0 and self.estimator.startswith("hist")


def channel_factor(stats: ChannelStats, cfg: MetricConfig) -> torch.Tensor:
    """The per-input-channel multiplier of |W| (length K, fp32)."""
    n = stats.norm()
    if cfg.method == "wanda" or (cfg.method == "esparse" and cfg.alpha == 0):
        return n
    if cfg.method != "esparse":
        raise ValueError(f"unknown method {cfg.method!r}; use one of {METHODS}")
    h = stats.entropy(cfg.estimator)
    if cfg.combine == "mul":
        return n * h.clamp_min(0).pow(cfg.alpha)
    if cfg.combine != "add":
        raise ValueError(f"unknown combine {cfg.combine!r}; use add or mul")
    return n / n.mean().clamp_min(1e-30) + cfg.alpha * h / h.mean().clamp_min(1e-30)


def importance(weight: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """S = |W| * factor (broadcast over rows), fp32; ``factor=None`` is magnitude."""
    s = weight.detach().float().abs()
    return s if factor is None else s * factor.to(s.device)[None, :]
