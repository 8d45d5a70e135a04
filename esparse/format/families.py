"""One description per decoder family (LLaMA, Qwen2, OPT): everything esparse knows of a family lives here.

Pruning, export, the FT folder format, the runtime and the tools ask a ``Family`` and never branch on the
architecture's name, so a new family (Mistral, Qwen2, ...) is one more description below. A description says:
* where the decoder layers sit in the Hugging Face model and how the HF config reads (``hf_shape``);
* the sharing groups: the linears that read one tensor and so share one channel permutation, and the
  producers whose output rows absorb a group's permutation (``attn_out``: v_proj; ``mlp_out``: gate/up or fc1);
  ``attn_in``/``mlp_in`` are absorbed by the norm named in ``group_norm``;
* the FasterTransformer tensors: each linear (FT stem, the HF linears fused into it, its input and output
  widths, tensor-parallel split, bias) and each non-linear tensor (FT name -> HF key), and config.ini's keys;
* what the runtime builds: RMSNorm or LayerNorm, rotary or learned positions, gated MLP or plain MLP;
* which variants of the HF config the runtime implements (``hf_shape``): every field that changes what the model
  computes is read there and either carried into config.ini (activation, linear biases, rope scaling) or
  refused with one line naming the field and its value, so that no export or prune ever yields a model that the
  runtime would compute differently from transformers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from esparse.errors import EsparseError

GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")

# The MLP activations the runtime implements, by their transformers name (config.json's hidden_act /
# activation_function): each is the same function transformers applies under that name.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"), "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}
FT_ACTIVATION_NAMES = {"silu": "Silu", "swish": "Silu", "relu": "Relu", "gelu": "Gelu", "gelu_new": "Gelu",
                       "gelu_pytorch_tanh": "Gelu"}  # FasterTransformer's activation_type spelling
ROPE_TYPES = ("default", "linear", "llama3")  # rotary variants the runtime implements (rope_inv_freq)
MAX_POSITIONS = 1 << 24  # more positions than any released LLaMA/OPT; a larger value is a corrupt config


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
    ft_tensors: dict[str, tuple[str, str, str]]  # FT name -> (size of each dim, "x"-joined; HF key; the
    # runtime's parameter it fills, python_api/model.py's Transformer)
    ft_layer_tensors: dict[str, str]  # per-layer FT local name -> HF local name, all of size hidden
    hf_embed: str  # the input embedding's HF key (the lm_head of tied models)
    ft_embed: str  # its FT name
    ft_section: str  # config.ini section FasterTransformer reads
    ft_extra: Callable[[object], dict]  # family-specific config.ini keys, from an FTConfig
    hf_shape: Callable[[object], dict]  # HF config -> inter, eps, rope_theta, act, biases, rope_scaling (refusing
    # every variant the runtime does not implement)
    rms_norm: bool  # RMSNorm (no bias) or LayerNorm (weight + bias)
    rotary: bool  # rotary positions (else learned, FT tensor "model.wpe")
    gated_mlp: bool  # act(gate) * up -> down (gate and up fused into one GEMM at run time); else act(fc1) -> fc2
    default_act: str  # the activation of folders that do not name one (format_version 1)
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


def _refuse(field: str, value, why: str, corrupt: bool = False) -> EsparseError:
    fix = ("the config is corrupt: fix config.json or re-download the model" if corrupt else
           "esparse would compute another model than transformers does, so it refuses this checkpoint")
    return EsparseError(f"the model's config has {field} = {value!r}, which {why}; {fix}")


def _positive_int(field: str, value, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(field, value, "is not a positive integer", corrupt=True)
    if high is not None and value > high:
        raise _refuse(field, value, f"is over esparse's limit of {high}", corrupt=True)
    return value


def _finite(field: str, value, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low < value < high):
        bounds = f"in ({low}, {high})" if high < math.inf else f"a finite number above {low}"
        raise _refuse(field, value, f"is not {bounds}", corrupt=True)
    return float(value)


def _common_shape(config) -> dict:
    """The sizes every family reads, checked (positive, kv heads dividing heads, positions bounded)."""
    for f in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        _positive_int(f, getattr(config, f, None))
    _positive_int("max_position_embeddings", getattr(config, "max_position_embeddings", None), MAX_POSITIONS)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    _positive_int("num_key_value_heads", kv)
    if heads % kv:
        raise _refuse("num_key_value_heads", kv, f"does not divide num_attention_heads = {heads}", corrupt=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    _positive_int("head_dim", head_dim)
    return {"head_dim": head_dim}


def _activation(field: str, value) -> str:
    if value not in ACTIVATIONS:
        raise _refuse(field, value, f"is not an activation the esparse runtime implements ({', '.join(ACTIVATIONS)})")
    return value


def rope_parameters(config) -> dict:
    """The rotary parameters of a HF config in transformers 5's form (``rope_parameters``), also from a
    transformers 4 config (``rope_theta`` + ``rope_scaling``)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    params.setdefault("rope_type", params.get("type", "default"))
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    return params


def check_rope_scaling(rope: dict, where: str = "rope_parameters") -> dict:
    """A rope scaling the runtime implements, as config.ini stores it ({} = none); anything else is refused."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise _refuse(f"{where}.rope_type", kind, f"is not a rotary scaling the esparse runtime implements "
                      f"({', '.join(ROPE_TYPES)})")
    partial_rot = rope.get("partial_rotary_factor", 1.0)
    if partial_rot not in (None, 1, 1.0):
        raise _refuse(f"{where}.partial_rotary_factor", partial_rot, "is not implemented (only 1.0)")
    if kind == "default":
        return {}
    out = {"rope_type": kind, "factor": _finite(f"{where}.factor", rope.get("factor"))}
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            out[key] = _finite(f"{where}.{key}", rope.get(key))
        out["original_max_position_embeddings"] = _positive_int(
            f"{where}.original_max_position_embeddings", rope.get("original_max_position_embeddings"), MAX_POSITIONS)
        if out["low_freq_factor"] >= out["high_freq_factor"]:
            raise _refuse(f"{where}.low_freq_factor", out["low_freq_factor"],
                          f"is not below high_freq_factor = {out['high_freq_factor']}", corrupt=True)
    return out


def rope_inv_freq(head_dim: int, theta: float, scaling: dict, device=None) -> torch.Tensor:
    """The rotary inverse frequencies [head_dim / 2] (float32), scaled as transformers scales them: ``linear``
    divides every frequency by the factor; ``llama3`` divides the low frequencies, keeps the high ones and
    interpolates between them."""
    steps = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    inv = 1.0 / (theta ** steps)
    kind = scaling.get("rope_type", "default") if scaling else "default"
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled)
    return inv


def _llama_shape(config) -> dict:
    head_dim = _common_shape(config)["head_dim"]
    if head_dim % 2:
        raise _refuse("head_dim", head_dim, "is odd (rotary positions rotate pairs of channels)", corrupt=True)
    rope = rope_parameters(config)
    theta = _finite("rope_theta", rope.get("rope_theta"))
    biases = []
    for field_name, groups in (("attention_bias", ("attn_in", "attn_out")), ("mlp_bias", ("mlp_in", "mlp_out"))):
        value = getattr(config, field_name, False)
        if value not in (True, False, None):
            raise _refuse(field_name, value, "is not true or false", corrupt=True)
        biases += list(groups) if value else []
    return {"inter": _positive_int("intermediate_size", getattr(config, "intermediate_size", None)),
            "eps": _finite("rms_norm_eps", getattr(config, "rms_norm_eps", None), 0.0, 1.0),
            "rope_theta": theta, "act": _activation("hidden_act", getattr(config, "hidden_act", "silu")),
            "biases": tuple(biases), "rope_scaling": check_rope_scaling(rope)}


def _qwen2_shape(config) -> dict:
    """Qwen2 reads as LLaMA does, except: q/k/v always carry biases (the family's FTLinear says so; Qwen2's
    config has no attention_bias / mlp_bias to read) and a sliding-window layer, which the runtime does not
    implement, is refused (Qwen2.5 ships with use_sliding_window false: every layer attends fully)."""
    layer_types = list(getattr(config, "layer_types", None) or ())
    if getattr(config, "use_sliding_window", False) and (not layer_types or "sliding_attention" in layer_types):
        raise _refuse("use_sliding_window", True, "makes layers attend to a sliding window only, which the esparse "
                      "runtime does not implement")
    if "sliding_attention" in layer_types:
        raise _refuse("layer_types", "sliding_attention", "is not implemented by the esparse runtime (only "
                      "full_attention)")
    plain = copy.copy(config)
    plain.attention_bias, plain.mlp_bias = False, False  # the qkv biases are fixed by the family, not the config
    return _llama_shape(plain)


def _opt_shape(config) -> dict:
    _common_shape(config)
    if config.word_embed_proj_dim != config.hidden_size or not config.do_layer_norm_before:
        raise EsparseError("OPT-350m-style models (project_in/out, post-LayerNorm) are not exported: "
                           "use another OPT size")
    if config.hidden_size % config.num_attention_heads:
        raise _refuse("hidden_size", config.hidden_size,
                      f"is not a multiple of num_attention_heads = {config.num_attention_heads}", corrupt=True)
    for field_name, want in (("enable_bias", True), ("layer_norm_elementwise_affine", True),
                             ("_remove_final_layer_norm", False)):
        value = getattr(config, field_name, want)
        if value != want:
            raise _refuse(field_name, value, f"is not implemented by the esparse runtime (only {want})")
    return {"inter": _positive_int("ffn_dim", getattr(config, "ffn_dim", None)), "eps": 1e-5, "rope_theta": 10000.0,
            "act": _activation("activation_function", getattr(config, "activation_function", "relu")),
            "biases": (), "rope_scaling": {}}  # OPT's linears always have biases (FTLinear.bias)


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
    ft_tensors={"model.wte.weight": ("vocab x hidden", "model.embed_tokens.weight", "tok_embeddings.weight"),
                "model.final_layernorm.weight": ("hidden", "model.norm.weight", "norm.weight")},
    ft_layer_tensors={"input_layernorm.weight": "input_layernorm.weight",
                      "post_attention_layernorm.weight": "post_attention_layernorm.weight"},
    hf_embed="model.embed_tokens.weight", ft_embed="model.wte.weight", ft_section="llama",
    ft_extra=lambda cfg: {"kv_head_num": cfg.n_kv, "rotary_embedding": cfg.head_dim, "rope_theta": cfg.rope_theta},
    hf_shape=_llama_shape, rms_norm=True, rotary=True, gated_mlp=True, default_act="silu",
)

# Qwen2 (Qwen2.5, Qwen2.5-Coder): LLaMA's layout with biases on q, k and v (fused into the FT qkv bias);
# o_proj and the MLP have none. Tied embeddings (the small models) are handled as for LLaMA: the exporter
# writes the input embedding as lm_head.
QWEN2 = replace(
    LLAMA, name="qwen2", hf_class="Qwen2ForCausalLM", hf_shape=_qwen2_shape,
    ft_linears=(replace(LLAMA.ft_linears[0], bias=True), *LLAMA.ft_linears[1:]),
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
    ft_tensors={"model.wte": ("vocab x hidden", "model.decoder.embed_tokens.weight", "tok_embeddings.weight"),
                "model.wpe": ("max_pos x hidden", "model.decoder.embed_positions.weight", "pos_embeddings.weight"),
                "model.final_layernorm.weight": ("hidden", "model.decoder.final_layer_norm.weight", "norm.weight"),
                "model.final_layernorm.bias": ("hidden", "model.decoder.final_layer_norm.bias", "norm.bias")},
    ft_layer_tensors={"input_layernorm.weight": "self_attn_layer_norm.weight",
                      "input_layernorm.bias": "self_attn_layer_norm.bias",
                      "post_attention_layernorm.weight": "final_layer_norm.weight",
                      "post_attention_layernorm.bias": "final_layer_norm.bias"},
    hf_embed="model.decoder.embed_tokens.weight", ft_embed="model.wte", ft_section="gpt",
    ft_extra=lambda cfg: {"layernorm_type": "pre_layernorm",
                          "activation_type": FT_ACTIVATION_NAMES[cfg.activation],
                          "has_post_decoder_layernorm": 1, "int8": 0},
    hf_shape=_opt_shape, rms_norm=False, rotary=False, gated_mlp=False, default_act="relu", position_offset=2,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, QWEN2, OPT)}


def family(name: str) -> Family:
    """The description of ``name`` (config.ini arch / HF model_type); a clear error for anything else."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise EsparseError(f"unsupported architecture {name!r}: esparse supports "
                           f"{', '.join(f.hf_class for f in FAMILIES.values())}") from None


def family_of(model: nn.Module) -> Family:
    return family(getattr(model.config, "model_type", None))
