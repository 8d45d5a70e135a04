"""Bad input: a clear error naming the problem and the fix, nothing half-written left behind."""

import json
import math
import shutil

import pytest
import torch

from esparse.cli import main
from esparse.converter.ppl import perplexity
from esparse.converter.text import calibration_windows, eval_windows, read_documents

from helpers import make_model, save_model


def _prune(model, calib, out, *extra):
    return main(["prune", str(model), "--calib", str(calib), "--out", str(out), "--nsamples", "2",
                 "--seqlen", "16", "--device", "cpu", *extra])


def _no_partial(folder):
    return not [p for p in folder.iterdir() if "partial" in p.name]


def test_missing_model(tmp_path, calib_file, capsys):
    assert _prune(tmp_path / "nope", calib_file, tmp_path / "out") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unsupported_arch(tmp_path, calib_file, llama_dir, capsys):
    bad = tmp_path / "gpt2"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (bad / "config.json").write_text(json.dumps(cfg))
    assert _prune(bad, calib_file, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err and "OPTForCausalLM" in err


def test_missing_calib_and_empty_and_short(tmp_path, llama_dir, capsys):
    assert _prune(llama_dir, tmp_path / "none.txt", tmp_path / "out") == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    assert _prune(llama_dir, empty, tmp_path / "out") == 2
    assert "empty" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("a few words\n")
    assert _prune(llama_dir, short, tmp_path / "out") == 2
    assert "too short" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and _no_partial(tmp_path)


def test_bad_jsonl(tmp_path, llama_dir, capsys):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert _prune(llama_dir, bad, tmp_path / "out") == 2
    assert 'c.jsonl:2' in capsys.readouterr().err


def test_input_dim_not_divisible(tmp_path, calib_file, capsys):
    model = save_model("llama", tmp_path / "m", hidden_size=72, num_attention_heads=4, num_key_value_heads=2)
    assert _prune(model, calib_file, tmp_path / "out", "--pattern", "4:16") == 2
    assert "not divisible by M=16" in capsys.readouterr().err


def test_existing_output_refused_unless_overwrite(tmp_path, calib_file, llama_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _prune(llama_dir, calib_file, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert _prune(llama_dir, calib_file, out, "--overwrite") == 2  # not esparse's: --overwrite does not take it
    assert "esparse did not write" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder is taken as it is
    assert _prune(llama_dir, calib_file, out) == 0 and (out / "esparse.json").is_file()
    assert _prune(llama_dir, calib_file, out, "--overwrite") == 0  # esparse's own output: replaced
    assert (out / "esparse.json").is_file() and (out / ".esparse-output").is_file()


def test_interrupted_write_leaves_nothing(tmp_path, calib_file, llama_dir, monkeypatch):
    import esparse.converter.pipeline as pl

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pl, "save_file", boom)
    with pytest.raises(RuntimeError):
        _prune(llama_dir, calib_file, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_partial(tmp_path)


def test_text_reading_formats(tmp_path):
    (tmp_path / "a.txt").write_text("line one\r\n\r\nline two\r\n")
    assert read_documents(tmp_path / "a.txt") == ["line one", "line two"]
    (tmp_path / "b.jsonl").write_text('{"text": "x y"}\n\n{"text": "z"}\n')
    assert read_documents(tmp_path / "b.jsonl") == ["x y", "z"]
    (tmp_path / "c.utf8").write_text('<doc id="1">\nA\nB\n</doc>\n<doc id="2">\nC\n</doc>\n')
    assert read_documents(tmp_path / "c.utf8") == ["A\nB", "C"]


def test_calibration_is_seeded_and_eval_windows_follow_protocol():
    _, tok = make_model("llama")
    docs = ["the quick brown fox jumps over the lazy dog"] * 30
    a = calibration_windows(tok, docs, 3, 8, seed=0)
    assert torch.equal(a, calibration_windows(tok, docs, 3, 8, seed=0))
    assert not torch.equal(a, calibration_windows(tok, docs, 3, 8, seed=1))
    w = eval_windows(tok, docs, 16)
    stream = tok("\n\n".join(docs), return_tensors="pt").input_ids[0]
    assert w.shape == (stream.numel() // 16, 16) and torch.equal(w.reshape(-1), stream[: w.numel()])


def test_perplexity_equals_mean_token_nll():
    model, _ = make_model("llama")
    ids = torch.randint(3, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert math.isclose(perplexity(model, ids), math.exp(float(nll)), rel_tol=1e-5)
