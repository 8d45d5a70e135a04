"""Sequential one-shot N:M pruning, layer by layer (as Wanda and SparseGPT do it), no weight updates.

For each decoder layer: pass 1 runs the still-dense layer on the calibration activations while forward
hooks reduce each sharing group's input into per-channel statistics; pass 2 adds histograms when an
entropy estimator needs them; then for each group: scores -> channel shuffle -> N:M masks in serving
order, scattered back to the original channel order and applied; pass 3 runs the pruned layer to make
layer i+1's inputs. Only one decoder layer and the activations live on the device at a time.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Group, decoder_base, get_linear, groups_of, head_shape
from .defaults import ESPARSE_DEFAULTS
from .masks import nm_mask
from .refine import refine_nm_mask
from .scores import MetricConfig, channel_factor, importance
from .shuffle import shuffle
from .sparsegpt import hessian_update, sparsegpt_nm_
from .stats import ChannelStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneConfig:
    n: int = 2
    m: int = 4
    metric: MetricConfig = field(default_factory=MetricConfig)
    gns: str | None = "preset"  # serpentine | round_robin | None (no global shuffle); "preset": the method's
    lbs: bool | None = None  # local block shuffle; None: the method's preset (on for E-Sparse only)
    block: int = 64
    iters: int = 100
    batch_size: int = 8  # calibration windows per forward call
    bins: int = 256
    sparsegpt_block: int = 128  # columns per lazy-update block (SparseGPT only)
    sparsegpt_damp: float = 0.01  # dampening, fraction of mean(diag H) (SparseGPT only)
    refine: int | None = None  # mask refinement: at most this many kept/pruned swaps per row (0: off;
    # converter/refine.py); None: the method's preset (ESPARSE_DEFAULTS["refine"] for E-Sparse, off otherwise)
    refine_damp: float = 0.01  # added to diag(X X^T) for the refinement, fraction of its mean (as SparseGPT)

    @classmethod
    def for_method(cls, method: str, n: int = 2, m: int = 4, **overrides) -> PruneConfig:
        """The preset of a method: E-Sparse with its defaults (converter/defaults.py: LBS and mask refinement on,
        GNS off), the baselines (magnitude, Wanda, SparseGPT) as published, without shuffles or refinement;
        ``overrides`` replace any field (``alpha=`` etc. go to the metric)."""
        metric_keys = {"alpha", "estimator", "combine"}
        metric = MetricConfig(method, **{k: overrides.pop(k) for k in list(overrides) if k in metric_keys})
        return cls(n=n, m=m, metric=metric, **overrides)

    def __post_init__(self) -> None:
        # The shuffles and the refinement are E-Sparse's; a baseline metric given without them runs as published.
        # The resolved values are what esparse.json's "config" records (to_json), never "preset" or None.
        es = self.metric.method == "esparse"
        if self.gns == "preset":
            object.__setattr__(self, "gns", ESPARSE_DEFAULTS["gns"] if es else None)
        if self.lbs is None:
            object.__setattr__(self, "lbs", es)
        if self.refine is None:
            object.__setattr__(self, "refine", ESPARSE_DEFAULTS["refine"] if es else 0)
        if self.refine < 0:
            raise ValueError(f"refine is a number of swaps per row (>= 0), got {self.refine}")
        if self.refine and self.metric.updates_weights:
            raise ValueError("SparseGPT chooses its masks with weight updates: refine (--refine) is for magnitude, "
                             "Wanda and E-Sparse")
        if self.metric.updates_weights and self.shuffles:
            raise ValueError("SparseGPT prunes in the original channel order: no shuffles (gns=None, lbs=False; "
                             "on the command line drop --gns/--lbs)")

    @property
    def shuffles(self) -> bool:
        return self.gns is not None or self.lbs

    @property
    def needs_calibration(self) -> bool:
        """Whether the masks depend on calibration activations. Magnitude without --refine chooses from |W|
        alone, so it needs no text and runs no forward pass (the forwards would only feed layers whose masks
        do not look at them)."""
        return self.metric.needs_stats or self.metric.updates_weights or self.refine > 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class PruneResult:
    perms: dict[str, torch.Tensor]  # "layers.{i}.{group}" -> int32 [K] (only where shuffled)
    layers: list[dict]  # per layer: sparsity per linear, kept fractions per group
    stage_seconds: dict[str, float]


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0 to capture its inputs (hidden states and keyword arguments)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.inner = layer
        self.captured: list[tuple[torch.Tensor, dict]] = []
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        self.captured.append((hidden_states, kwargs))
        raise _Stop


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, calib: torch.Tensor, device, batch_size: int):
    """Run the embeddings on ``calib`` [n, T] and return [(hidden [b, T, H], layer kwargs)] per batch."""
    base = decoder_base(model)
    layers = base.layers
    home = next(base.parameters()).device
    for mod in base.children():
        if mod is not layers:
            mod.to(device)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        for s in range(0, calib.shape[0], batch_size):
            try:
                model(input_ids=calib[s : s + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = catcher.inner
        for mod in base.children():
            if mod is not layers:
                mod.to(home)
    return catcher.captured


def _run_layer(layer: nn.Module, batches) -> list[torch.Tensor]:
    outs = []
    for h, kw in batches:
        out = layer(h, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _collect(layer, groups, batches, fn) -> None:
    """Run ``layer`` over all batches with a hook on each group's first linear calling fn(group, x)."""
    handles = [
        get_linear(layer, g.linears[0]).register_forward_hook(lambda _m, inp, _o, g=g: fn(g, inp[0]))
        for g in groups
    ]
    try:
        _run_layer(layer, batches)
    finally:
        for h in handles:
            h.remove()


def _gather_stats(layer, groups, batches, cfg: PruneConfig,
                  grams: dict[str, torch.Tensor] | None = None) -> dict[str, ChannelStats]:
    """Pass 1 (norms, ranges, energy sums; X X^T into ``grams`` when given) and, when the estimator needs it,
    pass 2 (histograms)."""
    stats: dict[str, ChannelStats] = {}

    def pass1(g: Group, x: torch.Tensor) -> None:
        if g.name not in stats:
            stats[g.name] = ChannelStats(x.shape[-1], x.device, cfg.bins, cfg.metric.needs_energy)
        stats[g.name].update(x)
        if grams is not None:
            grams[g.name] = hessian_update(grams.get(g.name), x)

    _collect(layer, groups, batches, pass1)
    if cfg.metric.needs_hist:
        shared = cfg.metric.estimator == "hist_layer"
        _collect(layer, groups, batches, lambda g, x: stats[g.name].update_hist(x, shared))
    return stats


def _group_perm(scores: list[torch.Tensor], group: Group, heads, cfg: PruneConfig):
    """Permutation [K] for one sharing group (and kept fractions), or None without shuffles."""
    if not cfg.shuffles:
        return None, {}
    stacked = torch.cat(scores, 0)
    if not group.per_head:
        perm, frac = shuffle(stacked[None], cfg.n, cfg.m, cfg.gns, cfg.lbs, cfg.block, cfg.iters)
        return perm[0], frac
    d, rep = heads.head_dim, heads.n_heads // heads.n_kv
    per_head = stacked.view(stacked.shape[0], heads.n_heads, d)
    batch = torch.stack(
        [per_head[:, j * rep : (j + 1) * rep].permute(1, 0, 2).reshape(-1, d) for j in range(heads.n_kv)]
    )
    pi, frac = shuffle(batch, cfg.n, cfg.m, cfg.gns, cfg.lbs, cfg.block, cfg.iters)
    kv_of = torch.arange(heads.n_heads, device=pi.device) // rep
    perm = (torch.arange(heads.n_heads, device=pi.device)[:, None] * d + pi[kv_of]).reshape(-1)
    return perm, frac


def _collect_grams(layer, groups, batches) -> dict[str, torch.Tensor]:
    """X X^T (fp64) of each sharing group's input over all calibration tokens, from one pass of the layer."""
    hess: dict[str, torch.Tensor] = {}

    def add(g: Group, x: torch.Tensor) -> None:
        hess[g.name] = hessian_update(hess.get(g.name), x)

    _collect(layer, groups, batches, add)
    return hess


def _sparsegpt_layer(layer, groups, batches, cfg: PruneConfig, report: dict) -> None:
    """One pass collects X X^T per sharing group (inputs of the dense layer), then each linear is pruned
    and updated by SparseGPT (converter/sparsegpt.py)."""
    hess = _collect_grams(layer, groups, batches)
    for g in groups:
        for path in g.linears:
            lin = get_linear(layer, path)
            sparsegpt_nm_(lin.weight, hess[g.name], cfg.n, cfg.m, cfg.sparsegpt_block, cfg.sparsegpt_damp)
            report["sparsity"][path] = float((lin.weight == 0).float().mean())


@torch.no_grad()
def prune_model(
    model: nn.Module, calib: torch.Tensor | None, cfg: PruneConfig, device: str | torch.device = "cpu"
) -> PruneResult:
    """Prune every decoder linear of ``model`` in place to cfg.n:cfg.m. ``calib`` is [n, seqlen] token ids,
    or None when the method needs no calibration (``cfg.needs_calibration``: magnitude without refinement).

    The whole stage on one screen, as Wanda's prune.py has it: per layer, statistics -> (SparseGPT) -> scores ->
    shuffle -> mask (+ refinement) -> the layer's outputs for the next; each step is a call into its module."""
    device = torch.device(device)
    heads = head_shape(model.config)
    groups = groups_of(model)
    layers = decoder_base(model).layers
    seconds: dict[str, float] = defaultdict(float)
    batches = None
    if cfg.needs_calibration:
        if calib is None:
            raise ValueError(f"method {cfg.metric.method} needs calibration token windows")
        t0 = time.perf_counter()
        batches = capture_layer0_inputs(model, calib, device, cfg.batch_size)
        seconds["capture"] += time.perf_counter() - t0
    result = PruneResult({}, [], seconds)
    bar = tqdm(range(len(layers)), desc="prune", unit="layer")
    last: float | None = None  # seconds the previous layer took: shown beside the stage in the progress bar

    def stage(what: str) -> None:
        """The bar's postfix: the running stage and the last layer's time (the rate tqdm shows is an average
        that hides a slow stage such as the refinement; a user sizing a 7B run wants seconds per layer)."""
        bar.set_postfix_str(what if last is None else f"{what} | last layer {last:.1f}s")

    for i in bar:
        t_layer = time.perf_counter()
        home = next(layers[i].parameters()).device  # layers return where they were (CPU offload or not)
        layer = layers[i].to(device)
        stats: dict[str, ChannelStats] = {}
        hess: dict[str, torch.Tensor] = {}  # X X^T per group, for the mask refinement only
        if cfg.metric.needs_stats:
            stage("stats")
            t = time.perf_counter()
            stats = _gather_stats(layer, groups, batches, cfg, hess if cfg.refine else None)
            seconds["stats"] += time.perf_counter() - t
        report: dict = {"sparsity": {}, "kept": {}}
        if cfg.metric.updates_weights:
            stage("sparsegpt")
            t = time.perf_counter()
            _sparsegpt_layer(layer, groups, batches, cfg, report)
            seconds["sparsegpt"] += time.perf_counter() - t
        if cfg.refine and not cfg.metric.needs_stats:  # magnitude: no statistics pass to share
            stage("gram")
            t = time.perf_counter()
            hess = _collect_grams(layer, groups, batches)
            seconds["refine"] += time.perf_counter() - t
        for g in [] if cfg.metric.updates_weights else groups:  # SparseGPT chose and applied its own masks
            lins = [get_linear(layer, p) for p in g.linears]
            t = time.perf_counter()
            factor = channel_factor(stats[g.name], cfg.metric) if cfg.metric.needs_stats else None
            scores = [importance(lin.weight, factor) for lin in lins]
            seconds["score"] += time.perf_counter() - t
            stage(f"{'shuffle' if cfg.shuffles else 'mask'} {g.name}{' + refine' if cfg.refine else ''}")
            t = time.perf_counter()
            perm, frac = _group_perm(scores, g, heads, cfg)
            if cfg.shuffles:
                seconds["shuffle"] += time.perf_counter() - t
            t = time.perf_counter()
            if cfg.refine:  # the group's Gram matrix in serving order, shared by its linears
                h = hess[g.name] if perm is None else hess[g.name][perm][:, perm]
            for path, lin, s in zip(g.linears, lins, scores, strict=False):
                serv = s if perm is None else s[:, perm]
                mask_serv = nm_mask(serv, cfg.n, cfg.m)
                if cfg.refine:  # lower this linear's output error by swaps inside groups (weights unchanged)
                    w_serv = lin.weight if perm is None else lin.weight[:, perm]
                    mask_serv, gain = refine_nm_mask(w_serv, mask_serv, h, cfg.m, cfg.refine, cfg.refine_damp)
                    report.setdefault("refined", {})[path] = gain
                mask = mask_serv if perm is None else torch.empty_like(mask_serv).index_copy_(1, perm, mask_serv)
                lin.weight.mul_(mask.to(lin.weight.dtype))
                report["sparsity"][path] = float((lin.weight == 0).float().mean())
            if perm is not None:
                result.perms[f"layers.{i}.{g.name}"] = perm.to(torch.int32).cpu()
                report["kept"][g.name] = frac
            seconds["mask"] += time.perf_counter() - t
        if batches is not None:  # the pruned layer's outputs are the next layer's calibration inputs
            stage("forward")
            t = time.perf_counter()
            new = _run_layer(layer, batches)
            batches = [(h, kw) for h, (_, kw) in zip(new, batches, strict=False)]
            seconds["forward"] += time.perf_counter() - t
        layers[i] = layer.to(home)
        last = time.perf_counter() - t_layer
        report["seconds"] = last
        result.layers.append(report)
        stage("done")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def summary_table(result: PruneResult) -> str:
    """Human-readable summary: time per stage and mean sparsity / kept fraction per linear type."""
    lines = ["stage        seconds"]
    lines += [f"{k:<12} {v:8.2f}" for k, v in result.stage_seconds.items()]
    by_type: dict[str, list[float]] = defaultdict(list)
    for rep in result.layers:
        for path, sp in rep["sparsity"].items():
            by_type[path.split(".")[-1]].append(sp)
    lines += ["", "linear       sparsity"]
    lines += [f"{k:<12} {sum(v) / len(v):8.4f}" for k, v in by_type.items()]
    kept: dict[str, list[dict]] = defaultdict(list)
    for rep in result.layers:
        for g, frac in rep["kept"].items():
            kept[g].append(frac)
    if kept:
        lines += ["", "group        kept-score fraction: identity -> GNS -> final"]
        for g, fr in kept.items():
            mean = {k: sum(f[k] for f in fr) / len(fr) for k in ("identity", "gns", "final")}
            lines.append(f"{g:<12} {mean['identity']:.4f} -> {mean['gns']:.4f} -> {mean['final']:.4f}")
    return "\n".join(lines)
