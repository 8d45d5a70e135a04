"""A new decoder family needs only a description (esparse/format/families.py): Qwen2, described there from the
LLaMA one (qkv with biases, o and the MLP without), is pruned, exported and run, and matches transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from esparse.cli import main
from esparse.errors import EsparseError
from esparse.format.families import QWEN2, family
from esparse.python_api import load_decoder
from esparse.python_api.generate import generate

from helpers import make_tokenizer


def _qwen2(path, tie: bool = False):
    torch.manual_seed(0)
    tok = make_tokenizer()
    # + 1: loaded for a qwen2 model, the tokenizer gains Qwen2's <|endoftext|> (id 300), which must embed too
    cfg = Qwen2Config(vocab_size=len(tok) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=10000.0, tie_word_embeddings=tie, use_sliding_window=False,
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


def test_qwen2_is_a_registered_family():
    assert family("qwen2") is QWEN2
    assert QWEN2.ft_linears[0].bias and not any(s.bias for s in QWEN2.ft_linears[1:])  # q/k/v biases only


def test_a_sliding_window_qwen2_is_refused_in_one_line(tmp_path, calib_file, capsys):
    src = _qwen2(tmp_path / "src")
    cfg = Qwen2Config.from_pretrained(src)
    cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 8, 0
    cfg.layer_types = ["sliding_attention"] * cfg.num_hidden_layers
    cfg.save_pretrained(src)
    capsys.readouterr()
    assert main(["prune", str(src), "--calib", str(calib_file), "--out", str(tmp_path / "p"), "--nsamples", "2",
                 "--seqlen", "16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sliding" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_described_family_prunes_exports_and_matches_transformers(tmp_path, calib_file, tie):
    src = _qwen2(tmp_path / "src", tie)
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
    prompt = [5, 17, 42, 9]  # greedy tokens through the runtime are transformers' greedy tokens
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(rt, [prompt], 12) == [want]
    if tie:  # a tied model's lm_head is its (pruned-model) input embedding, exported as such
        assert torch.equal(rt.output.weight, rt.tok_embeddings.weight)
