"""GGUF input: a tiny random LLaMA written as GGUF reads back to the same logits."""

import pytest
import torch

from esparse.cli import main
from esparse.converter.model_io import load_model
from esparse.errors import EsparseError

from gguf_writer import write_llama_gguf
from helpers import make_model

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    model, tok = make_model("llama")
    path = write_llama_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return model, tok, path


def test_gguf_reads_to_same_logits(gguf_file):
    ref_model, _, path = gguf_file
    model = load_model(path, dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = ref_model(input_ids=ids).logits, model(input_ids=ids).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_convert_gguf_writes_a_hf_folder(gguf_file, tmp_path):
    ref_model, _, path = gguf_file
    out = tmp_path / "hf"
    assert main(["convert-gguf", str(path), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    model = load_model(out, dtype=torch.float32)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = ref_model(input_ids=ids).logits, model(input_ids=ids).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-3  # saved in fp16


def test_prune_and_export_take_gguf(gguf_file, tmp_path, calib_file):
    _, _, path = gguf_file
    out = tmp_path / "pruned"
    assert main(["prune", str(path), "--calib", str(calib_file), "--out", str(out), "--nsamples", "2",
                 "--seqlen", "16", "--device", "cpu"]) == 0
    assert main(["export", str(path), "--out", str(tmp_path / "ft")]) == 0
    assert (tmp_path / "ft" / "1-gpu" / "config.ini").is_file()


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma3")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EsparseError, match="unsupported GGUF architecture 'gemma3'.*llama and qwen2"):
        load_model(tmp_path / "g.gguf")


def test_missing_extra_is_named(monkeypatch, tmp_path):
    import importlib.util

    from esparse.converter import gguf_io

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(EsparseError, match=r"esparse\[gguf\]"):
        gguf_io.gguf_architecture(tmp_path / "m.gguf")


@pytest.mark.parametrize("drop,hparams,msg", [
    (("blk.1.ffn_down.weight",), True, "tensors a 2-layer LLaMA needs"),
    (("token_embd.weight",), True, "token_embd.weight"),
    ((), False, "lacks the hyperparameters"),
])
def test_incomplete_gguf_is_refused_not_randomised(tmp_path, drop, hparams, msg, capsys):
    model, tok = make_model("llama")
    path = write_llama_gguf(model, tok, tmp_path / "bad.gguf", drop=drop, hparams=hparams)
    with pytest.raises(EsparseError, match=msg):
        load_model(path, dtype=torch.float32)
    assert main(["convert-gguf", str(path), "--out", str(tmp_path / "hf")]) == 2
    assert msg.split()[0] in capsys.readouterr().err and not (tmp_path / "hf").exists()


def _tiny_qwen2(tie: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from helpers import make_tokenizer

    torch.manual_seed(0)
    tok = make_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                      tie_word_embeddings=tie, use_sliding_window=False, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.5)  # biases that matter: a dropped one changes the logits
    return model, tok


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_qwen2_gguf_converts_prunes_exports_and_generates(tmp_path, calib_file, tie):
    from transformers import AutoModelForCausalLM

    from esparse.python_api import load_decoder
    from esparse.python_api.generate import generate

    ref_model, tok = _tiny_qwen2(tie)
    path = write_llama_gguf(ref_model, tok, tmp_path / "qwen.gguf")
    hf = tmp_path / "hf"
    assert main(["convert-gguf", str(path), "--out", str(hf)]) == 0
    model = load_model(hf, dtype=torch.float32)
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings == tie
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = ref_model(input_ids=ids).logits, model(input_ids=ids).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-3  # biases read, saved in fp16
    pruned, ft = tmp_path / "pruned", tmp_path / "ft"
    assert main(["prune", str(hf), "--calib", str(calib_file), "--out", str(pruned), "--nsamples", "2",
                 "--seqlen", "16", "--device", "cpu"]) == 0
    assert main(["export", str(pruned), "--out", str(ft), "--dtype", "fp32"]) == 0
    hf_pruned = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    rt = load_decoder(ft, device="cpu", dtype=torch.float32)
    prompt = [5, 17, 42, 9]
    with torch.no_grad():
        want = hf_pruned.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(rt, [prompt], 10) == [want]


def test_a_qwen2_gguf_without_its_biases_is_one_clear_error(tmp_path, capsys):
    model, tok = _tiny_qwen2(False)
    path = write_llama_gguf(model, tok, tmp_path / "bad.gguf", drop=("blk.1.attn_k.bias",))
    assert main(["convert-gguf", str(path), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensors a 2-layer Qwen2 needs (first: blk.1.attn_k.bias)" in err[0]
