"""Per-input-channel statistics of a linear's input, reduced on the fly from calibration activations.

Pass 1 collects the squared L2 norm, min/max and the energy-entropy sums; pass 2 (only when a histogram
entropy estimator is in use) bins each value into one of ``bins`` bins of its channel's [min, max] range
(or the whole input's range). Everything is fp32 in, fp64 accumulators out, so a 128 x 2048-token
calibration set cannot lose small contributions.
"""

from __future__ import annotations

import math

import torch

ENTROPY_ESTIMATORS = ("hist", "hist_layer", "energy")


class ChannelStats:
    """Accumulates statistics of the K channels of one linear input over all calibration tokens."""

    def __init__(self, k: int, device: torch.device | str, bins: int = 256, energy: bool = True):
        self.k, self.bins, self.ntokens, self.track_energy = k, bins, 0, energy
        f64 = dict(device=device, dtype=torch.float64)
        self.sumsq = torch.zeros(k, **f64)
        self.energy_xlogx = torch.zeros(k, **f64)  # sum_t e ln e with e = x^2
        self.lo = torch.full((k,), math.inf, device=device)
        self.hi = torch.full((k,), -math.inf, device=device)
        self.hist: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Pass 1: fold a batch of inputs ``[..., K]`` into the running sums."""
        x = x.reshape(-1, self.k).float()
        e = x * x
        self.sumsq += e.sum(0, dtype=torch.float64)
        if self.track_energy:
            self.energy_xlogx += torch.xlogy(e, e).sum(0, dtype=torch.float64)
        self.lo = torch.minimum(self.lo, x.amin(0))
        self.hi = torch.maximum(self.hi, x.amax(0))
        self.ntokens += x.shape[0]

    def update_hist(self, x: torch.Tensor, shared_range: bool = False) -> None:
        """Pass 2: add ``x`` to the per-channel histograms (needs pass 1's ranges)."""
        x = x.reshape(-1, self.k).float()
        lo, hi = (self.lo.min(), self.hi.max()) if shared_range else (self.lo, self.hi)
        width = (hi - lo).clamp_min(1e-30)
        b = ((x - lo) / width * self.bins).floor().clamp_(0, self.bins - 1).long()
        b += torch.arange(self.k, device=x.device) * self.bins
        counts = torch.bincount(b.view(-1), minlength=self.k * self.bins).view(self.k, self.bins)
        self.hist = counts if self.hist is None else self.hist + counts

    def norm(self) -> torch.Tensor:
        """n_j = sqrt(sum_t x_tj^2), fp32."""
        return self.sumsq.sqrt().float()

    def entropy(self, estimator: str = "hist") -> torch.Tensor:
        """H_j in nats. ``hist``/``hist_layer``: Shannon entropy of the value histogram (per-channel or
        shared range); ``energy``: entropy of the channel's energy distribution over tokens,
        p_t = x_t^2 / sum x^2, i.e. ln S - sum(e ln e)/S (how spread out over tokens a channel's mass is).
        """
        if estimator == "energy":
            if not self.track_energy:
                raise RuntimeError("energy entropy was not tracked (ChannelStats(energy=False))")
            s = self.sumsq
            h = torch.where(s > 0, s.log() - self.energy_xlogx / s.clamp_min(1e-300), torch.zeros_like(s))
            return h.float()
        if estimator not in ENTROPY_ESTIMATORS:
            raise ValueError(f"unknown entropy estimator {estimator!r}; use one of {ENTROPY_ESTIMATORS}")
        if self.hist is None:
            raise RuntimeError("histogram entropy needs pass 2 (update_hist) first")
        p = self.hist.double() / self.ntokens
        h = -torch.xlogy(p, p).sum(1)
        if estimator == "hist":
            h = torch.where(self.hi > self.lo, h, torch.zeros_like(h))
        return h.float()
