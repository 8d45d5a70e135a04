"""One description per decoder family (LLaMA, OPT): everything esparse knows of a family lives here.

Pruning, export, the FT folder format, the runtime and the tools ask a ``Family`` and never branch on the
architecture's name, so a new family (Mistral, Qwen2, ...) is one more description below. A description says:
* where the decoder layers sit in the Hugging Face model and how the HF config reads (``hf_shape``);
* the sharing groups: the linears that read one tensor and so share one channel permutation, and the
  producers whose output rows absorb a group's permutation (``attn_out``: v_proj; ``mlp_out``: gate/up or fc1);
  ``attn_in``/``mlp_in`` are absorbed by the norm named in ``group_norm``;
* the FasterTransformer tensors: each linear (FT stem, the HF linears fused into it, its input and output
  widths, tensor-parallel split, bias) and each non-linear tensor (FT name -> HF key), and config.ini's keys;
* what the runtime builds: RMSNorm or LayerNorm, rotary or learned positions, gated SiLU MLP or ReLU MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from esparse.errors import EsparseError

GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class Group:
    name: str  # attn_in | attn_out | mlp_in | mlp_out
    linears: tuple[str, ...]  # module paths inside a decoder layer
    per_head: bool = False  # P must stay inside each head (attention output)


@dataclass(frozen=True)
class FTLinear:
    """One FT linear of a decoder layer: ``stem`` (under model.layers.<i>.), the HF linears fused into it in
    output order, its input width and output segments as names of FTConfig sizes ("q" = heads x head_dim,
    "kv" = kv heads x head_dim), the tensor-parallel split and whether it has a bias."""

    stem: str
    hf: tuple[str, ...]
    group: str
    parallel: str  # col | row
    k: str  # hidden | q | inter
    segments: tuple[str, ...]  # e.g. ("q", "kv", "kv")
    bias: bool = False


@dataclass(frozen=True)
class Family:
    name: str  # config.ini's arch and HF's model_type
    hf_class: str  # for messages
    decoder_path: str  # the HF module that owns ``layers``
    groups: tuple[Group, ...]
    producers: dict[str, tuple[str, ...]]  # group -> linears whose output rows carry its permutation
    ft_linears: tuple[FTLinear, ...]
    ft_tensors: dict[str, tuple[str, str]]  # FT name -> (size of each dim, "x"-joined; HF key)
    ft_layer_tensors: dict[str, str]  # per-layer FT local name -> HF local name, all of size hidden
    hf_embed: str  # the input embedding's HF key (the lm_head of tied models)
    ft_embed: str  # its FT name
    ft_section: str  # config.ini section FasterTransformer reads
    ft_extra: Callable[[object], dict]  # family-specific config.ini keys, from an FTConfig
    hf_shape: Callable[[object], dict]  # HF config -> inter, eps, rope_theta (refusing unsupported variants)
    rms_norm: bool  # RMSNorm (no bias) or LayerNorm (weight + bias)
    rotary: bool  # rotary positions (else learned, FT tensor "model.wpe")
    gated_mlp: bool  # SiLU(gate) * up -> down (gate and up fused into one GEMM at run time); else ReLU fc1 -> fc2
    position_offset: int = 0  # rows of HF's learned position table before position 0 (OPT: 2)
    group_norm: dict[str, str] = field(
        default_factory=lambda: {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"})

    def linears_of_group(self) -> dict[str, tuple[str, ...]]:
        return {g.name: g.linears for g in self.groups}

    def ft_linear(self, group: str, parallel: str) -> FTLinear:
        """The FT linear of ``group`` with this split (e.g. the row-parallel linear reading mlp_out)."""
        return next(s for s in self.ft_linears if s.group == group and s.parallel == parallel)

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.decoder_path)


def _llama_shape(config) -> dict:
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get(
        "rope_theta", 10000.0)
    return {"inter": config.intermediate_size, "eps": config.rms_norm_eps, "rope_theta": theta}


def _opt_shape(config) -> dict:
    if config.word_embed_proj_dim != config.hidden_size or not config.do_layer_norm_before:
        raise EsparseError("OPT-350m-style models (project_in/out, post-LayerNorm) are not exported: "
                           "use another OPT size")
    return {"inter": config.ffn_dim, "eps": 1e-5, "rope_theta": 10000.0}


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

LLAMA = Family(
    name="llama", hf_class="LlamaForCausalLM", decoder_path="model",
    groups=(Group("attn_in", _QKV), Group("attn_out", ("self_attn.o_proj",), per_head=True),
            Group("mlp_in", ("mlp.gate_proj", "mlp.up_proj")), Group("mlp_out", ("mlp.down_proj",))),
    producers={"attn_out": ("self_attn.v_proj",), "mlp_out": ("mlp.gate_proj", "mlp.up_proj")},
    ft_linears=(
        FTLinear("attention.query_key_value", _QKV, "attn_in", "col", "hidden", ("q", "kv", "kv")),
        FTLinear("attention.dense", ("self_attn.o_proj",), "attn_out", "row", "q", ("hidden",)),
        FTLinear("mlp.gate_proj", ("mlp.gate_proj",), "mlp_in", "col", "hidden", ("inter",)),
        FTLinear("mlp.up_proj", ("mlp.up_proj",), "mlp_in", "col", "hidden", ("inter",)),
        FTLinear("mlp.down_proj", ("mlp.down_proj",), "mlp_out", "row", "inter", ("hidden",)),
    ),
    ft_tensors={"model.wte.weight": ("vocab x hidden", "model.embed_tokens.weight"),
                "model.final_layernorm.weight": ("hidden", "model.norm.weight")},
    ft_layer_tensors={"input_layernorm.weight": "input_layernorm.weight",
                      "post_attention_layernorm.weight": "post_attention_layernorm.weight"},
    hf_embed="model.embed_tokens.weight", ft_embed="model.wte.weight", ft_section="llama",
    ft_extra=lambda cfg: {"kv_head_num": cfg.n_kv, "rotary_embedding": cfg.head_dim, "rope_theta": cfg.rope_theta},
    hf_shape=_llama_shape, rms_norm=True, rotary=True, gated_mlp=True,
)

OPT = Family(
    name="opt", hf_class="OPTForCausalLM", decoder_path="model.decoder",
    groups=(Group("attn_in", _QKV), Group("attn_out", ("self_attn.out_proj",), per_head=True),
            Group("mlp_in", ("fc1",)), Group("mlp_out", ("fc2",))),
    producers={"attn_out": ("self_attn.v_proj",), "mlp_out": ("fc1",)},
    ft_linears=(
        FTLinear("attention.query_key_value", _QKV, "attn_in", "col", "hidden", ("q", "kv", "kv"), True),
        FTLinear("attention.dense", ("self_attn.out_proj",), "attn_out", "row", "q", ("hidden",), True),
        FTLinear("mlp.dense_h_to_4h", ("fc1",), "mlp_in", "col", "hidden", ("inter",), True),
        FTLinear("mlp.dense_4h_to_h", ("fc2",), "mlp_out", "row", "inter", ("hidden",), True),
    ),
    ft_tensors={"model.wte": ("vocab x hidden", "model.decoder.embed_tokens.weight"),
                "model.wpe": ("max_pos x hidden", "model.decoder.embed_positions.weight"),
                "model.final_layernorm.weight": ("hidden", "model.decoder.final_layer_norm.weight"),
                "model.final_layernorm.bias": ("hidden", "model.decoder.final_layer_norm.bias")},
    ft_layer_tensors={"input_layernorm.weight": "self_attn_layer_norm.weight",
                      "input_layernorm.bias": "self_attn_layer_norm.bias",
                      "post_attention_layernorm.weight": "final_layer_norm.weight",
                      "post_attention_layernorm.bias": "final_layer_norm.bias",
                      # row-parallel biases are added once after the reduction: stored whole, not per rank
                      "attention.dense.bias": "self_attn.out_proj.bias",
                      "mlp.dense_4h_to_h.bias": "fc2.bias"},
    hf_embed="model.decoder.embed_tokens.weight", ft_embed="model.wte", ft_section="gpt",
    ft_extra=lambda cfg: {"layernorm_type": "pre_layernorm", "activation_type": "Relu",
                          "has_post_decoder_layernorm": 1, "int8": 0},
    hf_shape=_opt_shape, rms_norm=False, rotary=False, gated_mlp=False, position_offset=2,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, OPT)}


def family(name: str) -> Family:
    """The description of ``name`` (config.ini arch / HF model_type); a clear error for anything else."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise EsparseError(f"unsupported architecture {name!r}: esparse supports "
                           f"{', '.join(f.hf_class for f in FAMILIES.values())}") from None


def family_of(model: nn.Module) -> Family:
    return family(getattr(model.config, "model_type", None))
