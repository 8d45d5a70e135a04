"""Model helpers shared by pruning and export: head shapes, a checked linear lookup, and the family's view of
a loaded HF model (its sharing groups and decoder layers; the descriptions themselves are in families.py).

A sharing group is the set of linears that read one tensor. They share one channel permutation P, which
is realised at no runtime cost: by the norm that writes their input (groups ``attn_in``/``mlp_in``), or by
permuting the rows of the linear that produces it (``attn_out``: v_proj rows within each kv head;
``mlp_out``: gate/up or fc1 rows).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from esparse.errors import EsparseError
from esparse.format.families import Group, family_of

__all__ = ["Group", "HeadShape", "decoder_base", "get_linear", "groups_of", "head_shape"]


@dataclass(frozen=True)
class HeadShape:
    n_heads: int
    n_kv: int
    head_dim: int


def groups_of(model: nn.Module) -> tuple[Group, ...]:
    return family_of(model).groups


def decoder_base(model: nn.Module) -> nn.Module:
    """The module that owns the ``layers`` list (LlamaModel, OPTDecoder)."""
    return family_of(model).decoder(model)


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
