"""Issue 24, class 1: config variants. Each variant the runtime implements (LLaMA gelu / tanh-gelu MLPs,
attention and MLP biases, linear and llama3 rope scaling, tied embeddings; OPT gelu) is pruned with the shuffles,
exported and run, and its logits match transformers' within the bound every runtime test uses (relative L2 error
1e-3); each check also shows that ignoring the variant would miss that bound. Each variant it does not implement is
one ``esparse: error:`` line naming the field and its value, at prune and at export, with nothing written."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from esparse.cli import main
from esparse.format.families import ACTIVATIONS, rope_inv_freq
from esparse.python_api import load_decoder

from helpers import make_model

BOUND = 1e-3  # relative L2 error of the logits, as tests/test_runtime.py
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

IMPLEMENTED = {
    "llama-gelu": ("llama", dict(hidden_act="gelu")),
    "llama-gelu-tanh": ("llama", dict(hidden_act="gelu_pytorch_tanh")),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-attention-bias": ("llama", dict(attention_bias=True)),
    "llama-rope-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                         "factor": 4.0})),
    "llama-rope-llama3": ("llama", dict(rope_parameters=LLAMA3)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "opt-gelu": ("opt", dict(activation_function="gelu")),
}


def _save(arch: str, path, **kw):
    model, tok = make_model(arch, seed=3, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias") or name.endswith("fc1.bias") or name.endswith("fc2.bias"):
                p.normal_(0, 0.5)  # biases that matter, so that a dropped or misplaced one shows
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _ignoring_variant(rt, variant: str) -> None:
    """Turn the runtime into what it computed before the variant was implemented."""
    if "gelu" in variant:
        for block in rt.layers:
            block.feed_forward.act = "silu" if rt.family.gated_mlp else "relu"
    elif "bias" in variant:
        for block in rt.layers:
            for lin in (block.attention.wqkv, block.attention.wo, block.feed_forward.w1, block.feed_forward.w2):
                if lin.bias is not None:
                    lin.bias.zero_()
    elif "rope" in variant:
        rt.inv_freq = rope_inv_freq(rt.cfg.head_dim, rt.cfg.rope_theta, {})
    elif variant == "llama-tied":
        rt.output.weight.copy_(torch.randn_like(rt.output.weight))


@pytest.mark.parametrize("variant", list(IMPLEMENTED))
def test_implemented_variant_matches_transformers(variant, tmp_path, calib_file):
    arch, kw = IMPLEMENTED[variant]
    src = _save(arch, tmp_path / "src", **kw)
    pruned = tmp_path / "pruned"
    assert main(["prune", str(src), "--calib", str(calib_file), "--out", str(pruned), "--nsamples", "2",
                 "--seqlen", "16", "--device", "cpu"]) == 0
    assert main(["export", str(pruned), "--out", str(tmp_path / "ft"), "--dtype", "fp32"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    rt = load_decoder(tmp_path / "ft", device="cpu", dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = rt(ids, rt.new_cache(2, 48), 0, all_logits=True)
        assert _rel(got, ref) <= BOUND
        _ignoring_variant(rt, variant)
        naive = rt(ids, rt.new_cache(2, 48), 0, all_logits=True)
    assert _rel(naive, ref) > 5 * BOUND  # the comparison is sensitive to the variant


def test_config_ini_names_the_variant(tmp_path):
    src = _save("llama", tmp_path / "src", hidden_act="gelu", attention_bias=True, rope_parameters=LLAMA3)
    assert main(["export", str(src), "--out", str(tmp_path / "ft"), "--dtype", "fp32"]) == 0
    ini = (tmp_path / "ft" / "1-gpu" / "config.ini").read_text()
    for line in ("activation = gelu", "biases = attn_in,attn_out", "rope_scaling_type = llama3",
                 "rope_scaling_factor = 8.0", "rope_scaling_original_max_position_embeddings = 32"):
        assert line in ini
    assert set(ACTIVATIONS) >= {"silu", "relu", "gelu", "gelu_pytorch_tanh", "gelu_new"}


REFUSED = {
    "rope-dynamic": ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
                     "rope_parameters.rope_type = 'dynamic'"),
    "rope-yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                                "original_max_position_embeddings": 64}},
                  "rope_parameters.rope_type = 'yarn'"),
    "partial-rotary": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.5}}, "partial_rotary_factor = 0.5"),
    "llama-act": ("llama", {"hidden_act": "gelu_fast"}, "hidden_act = 'gelu_fast'"),
    "opt-act": ("opt", {"activation_function": "gelu_fast"}, "activation_function = 'gelu_fast'"),
    "opt-no-bias": ("opt", {"enable_bias": False}, "enable_bias = False"),
    "opt-no-affine": ("opt", {"layer_norm_elementwise_affine": False}, "layer_norm_elementwise_affine = False"),
    "eps-nan": ("llama", {"rms_norm_eps": float("nan")}, "rms_norm_eps = nan"),
    "no-layers": ("llama", {"num_hidden_layers": 0}, "num_hidden_layers = 0"),
    "negative-layers": ("llama", {"num_hidden_layers": -1}, "num_hidden_layers = -1"),
    "kv-heads": ("llama", {"num_key_value_heads": 3}, "num_key_value_heads = 3"),
    "positions": ("llama", {"max_position_embeddings": 10**12}, "max_position_embeddings = 1000000000000"),
}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return {arch: _save(arch, root / arch) for arch in ("llama", "opt")}


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("command", ["prune", "export"])
def test_unimplemented_variant_is_one_error_and_nothing_written(case, command, plain, tmp_path, calib_file,
                                                                capsys):
    arch, edit, named = REFUSED[case]
    src = tmp_path / "src"
    shutil.copytree(plain[arch], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(edit)
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    argv = ([command, str(src), "--calib", str(calib_file), "--out", str(out), "--nsamples", "2", "--seqlen", "16",
             "--device", "cpu"] if command == "prune" else [command, str(src), "--out", str(out)])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esparse: error:"), err
    assert named in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary folder
