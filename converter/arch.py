"""What esparse needs to know of each supported architecture: decoder layers and sharing groups (§7).

A sharing group is the set of linears that read one tensor. They share one channel permutation P, which
is realised at no runtime cost: by the norm that writes their input (groups ``attn_in``/``mlp_in``), or by
permuting the rows of the linear that produces it (``attn_out``: v_proj rows within each kv head;
``mlp_out``: gate/up or fc1 rows).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import EsparseError


@dataclass(frozen=True)
class Group:
    name: str  # attn_in | attn_out | mlp_in | mlp_out
    linears: tuple[str, ...]  # module paths inside a decoder layer
    per_head: bool = False  # P must stay inside each head (attention output)


LLAMA_GROUPS = (
    Group("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Group("attn_out", ("self_attn.o_proj",), per_head=True),
    Group("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
    Group("mlp_out", ("mlp.down_proj",)),
)
OPT_GROUPS = (
    Group("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Group("attn_out", ("self_attn.out_proj",), per_head=True),
    Group("mlp_in", ("fc1",)),
    Group("mlp_out", ("fc2",)),
)


@dataclass(frozen=True)
class HeadShape:
    n_heads: int
    n_kv: int
    head_dim: int


def model_type(model: nn.Module) -> str:
    mt = getattr(model.config, "model_type", None)
    if mt not in ("llama", "opt"):
        raise EsparseError(f"unsupported architecture {mt!r}: esparse supports LlamaForCausalLM, OPTForCausalLM")
    return mt


def groups_of(model: nn.Module) -> tuple[Group, ...]:
    return LLAMA_GROUPS if model_type(model) == "llama" else OPT_GROUPS


def decoder_base(model: nn.Module) -> nn.Module:
    """The module that owns the ``layers`` list (LlamaModel, OPTDecoder)."""
    return model.model if model_type(model) == "llama" else model.model.decoder


def head_shape(config) -> HeadShape:
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return HeadShape(n_heads, n_kv, head_dim)


def get_linear(layer: nn.Module, path: str) -> nn.Linear:
    mod = layer.get_submodule(path)
    if not isinstance(mod, nn.Linear):
        raise EsparseError(f"{path} is a {type(mod).__name__}, not nn.Linear: quantized models are not supported")
    return mod
