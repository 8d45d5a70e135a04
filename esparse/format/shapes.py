"""The shapes of released models in the format's terms: one table every benchmark and tool reads.

A shape is an FTConfig without weights (``shape_config``); ``gemm_shapes`` says which GEMMs one decoder layer of it
runs, as the runtime fuses them (gate and up in one GEMM for a gated MLP).
"""

from __future__ import annotations

from esparse.errors import EsparseError

from .ft_format import FTConfig, linear_specs

SHAPES = {
    "llama-7b": dict(arch="llama", hidden=4096, n_heads=32, n_kv=32, head_dim=128, inter=11008, n_layers=32,
                     vocab=32000, max_pos=4096, eps=1e-6),
    "llama-13b": dict(arch="llama", hidden=5120, n_heads=40, n_kv=40, head_dim=128, inter=13824, n_layers=40,
                      vocab=32000, max_pos=4096, eps=1e-6),
    "opt-6.7b": dict(arch="opt", hidden=4096, n_heads=32, n_kv=32, head_dim=128, inter=16384, n_layers=32,
                     vocab=50272, max_pos=2048, eps=1e-5),
    "smollm2-135m": dict(arch="llama", hidden=576, n_heads=9, n_kv=3, head_dim=64, inter=1536, n_layers=30,
                         vocab=49152, max_pos=8192, eps=1e-5, rope_theta=100000.0),
}
GEMM_NAMES = {"attn_in": "qkv", "attn_out": "o", "mlp_in": "fc1", "mlp_out": "fc2"}


def shape_config(shape: str, layers: int | None = None, **kw) -> FTConfig:
    """The FTConfig of a named model shape (the one table of shapes every benchmark uses)."""
    spec = dict(SHAPES[shape])
    if layers:
        spec["n_layers"] = layers
    return FTConfig(**spec, **kw)


def gemm_shapes(shape: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of each GEMM one decoder layer of ``shape`` runs, as the runtime runs them (a gated MLP's
    gate and up fused into one "gate_up" GEMM; its down projection named "down")."""
    cfg = shape_config(shape)
    fam = cfg.family
    out: dict[str, list[int]] = {}
    for s in linear_specs(cfg, 0):
        name = GEMM_NAMES[s.group]
        if fam.gated_mlp and s.group in ("mlp_in", "mlp_out"):
            name = "gate_up" if s.group == "mlp_in" else "down"
        n, k = out.get(name, [0, s.k])
        out[name] = [n + s.n, k]
    return [(name, n, k) for name, (n, k) in out.items()]


def llama_shapes() -> list[str]:
    return [s for s in SHAPES if shape_config(s).family.hf_class == "LlamaForCausalLM"]


def hf_llama_config(shape: str, layers: int | None = None) -> dict:
    """transformers LlamaConfig arguments of a LLaMA-family shape (for benchmarks that build an HF model)."""
    cfg = shape_config(shape, layers)
    if shape not in llama_shapes():
        raise EsparseError(f"{shape} is not a LLaMA shape: pick one of {', '.join(llama_shapes())}")
    return dict(hidden_size=cfg.hidden, intermediate_size=cfg.inter, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv, vocab_size=cfg.vocab,
                max_position_embeddings=cfg.max_pos, rms_norm_eps=cfg.eps, rope_theta=cfg.rope_theta)
