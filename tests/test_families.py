"""A new decoder family needs only a description (converter/families.py): Qwen2, described here from the
LLaMA one (qkv with biases, o and the MLP without), is pruned, exported and run, and matches transformers."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from esparse.cli import main
from esparse.errors import EsparseError
from esparse.format import families
from esparse.format.families import LLAMA, FTLinear, family
from esparse.python_api import load_decoder

from helpers import make_tokenizer

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
QWEN2 = replace(
    LLAMA, name="qwen2", hf_class="Qwen2ForCausalLM",
    ft_linears=(FTLinear("attention.query_key_value", QKV, "attn_in", "col", "hidden", ("q", "kv", "kv"), True),
                *LLAMA.ft_linears[1:]),
)


@pytest.fixture
def qwen2_family(monkeypatch):
    monkeypatch.setitem(families.FAMILIES, "qwen2", QWEN2)


def _qwen2(path):
    torch.manual_seed(0)
    tok = make_tokenizer()
    # + 1: loaded for a qwen2 model, the tokenizer gains Qwen2's <|endoftext|> (id 300), which must embed too
    cfg = Qwen2Config(vocab_size=len(tok) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=10000.0, tie_word_embeddings=False, use_sliding_window=False,
                      bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.5)  # biases that matter, so that a dropped or misplaced one shows
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_unknown_family_is_one_clear_error():
    with pytest.raises(EsparseError, match="unsupported architecture 'mamba'.*LlamaForCausalLM"):
        family("mamba")


def test_a_described_family_prunes_exports_and_matches_transformers(qwen2_family, tmp_path, calib_file):
    src = _qwen2(tmp_path / "src")
    pruned = tmp_path / "pruned"
    assert main(["prune", str(src), "--calib", str(calib_file), "--out", str(pruned), "--nsamples", "2",
                 "--seqlen", "16", "--device", "cpu"]) == 0
    ft = tmp_path / "ft"
    assert main(["export", str(pruned), "--out", str(ft), "--dtype", "fp32"]) == 0
    assert (ft / "1-gpu" / "model.layers.0.attention.query_key_value.bias.0.bin").is_file()
    hf = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    rt = load_decoder(ft, device="cpu", dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = rt(ids, rt.new_cache(2, 32), 0, all_logits=True)
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-3  # the bound the LLaMA/OPT runtime tests use
