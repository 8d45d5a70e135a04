"""Issue 24, class 2: a checkpoint that lacks a weight its architecture needs, or holds weights its config does not
use, is refused with one error line before anything is written; transformers' random initialisation of a missing
tensor never reaches a pruned folder, a perplexity or an export. The same for GGUF files whose header and tensors
disagree."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from esparse.cli import main

from helpers import make_model, save_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_model("llama", tmp_path_factory.mktemp("w") / "llama")


def _run(command, src, tmp_path, calib):
    out = tmp_path / "out"
    if command == "prune":
        argv = ["prune", str(src), "--calib", str(calib), "--out", str(out), "--nsamples", "2", "--seqlen", "16",
                "--device", "cpu"]
    elif command == "export":
        argv = ["export", str(src), "--out", str(out)]
    else:
        argv = ["ppl", str(src), "--text", str(calib), "--seqlen", "16", "--device", "cpu"]
    return main(argv), out


def _one_error(capsys) -> str:
    """The one error line (progress bars of the loading aside), and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("esparse: error:"), err[-2000:]
    return lines[0]


def _drop(src, dst, *keys):
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    for k in keys:
        sd.pop(k)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("command", ["prune", "ppl", "export"])
def test_a_missing_tensor_is_refused_not_randomised(command, llama, tmp_path, calib_file, capsys):
    src = _drop(llama, tmp_path / "src", "model.layers.1.mlp.down_proj.weight")
    capsys.readouterr()
    rc, out = _run(command, src, tmp_path, calib_file)
    assert rc == 2
    line = _one_error(capsys)
    assert "lacks 1 tensor(s)" in line and "model.layers.1.mlp.down_proj.weight" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_export_without_lm_head_is_refused(llama, tmp_path, calib_file, capsys):
    src = _drop(llama, tmp_path / "src", "lm_head.weight")  # tie_word_embeddings is false: the head is needed
    capsys.readouterr()
    rc, out = _run("export", src, tmp_path, calib_file)
    assert rc == 2 and "lm_head.weight" in _one_error(capsys) and not out.exists()


def test_a_tied_model_without_lm_head_is_fine(tmp_path, calib_file):
    src = save_model("llama", tmp_path / "src", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(src / "model.safetensors"))
    rc, out = _run("export", src, tmp_path, calib_file)
    assert rc == 0 and (out / "1-gpu" / "model.lm_head.weight.bin").is_file()


def test_an_index_that_leaves_out_a_layer_is_refused(tmp_path, calib_file, capsys):
    model, tok = make_model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="100KB")
    tok.save_pretrained(src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    dropped = sorted(k for k, f in index["weight_map"].items() if f == shard)  # the index no longer names that shard
    for k in dropped:
        del index["weight_map"][k]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    capsys.readouterr()
    rc, out = _run("prune", src, tmp_path, calib_file)
    line = _one_error(capsys)
    assert rc == 2 and f"lacks {len(dropped)} tensor(s) (first: {dropped[0]}" in line and not out.exists()


def test_fewer_layers_in_the_config_than_in_the_weights_is_refused(llama, tmp_path, calib_file, capsys):
    src = tmp_path / "src"
    shutil.copytree(llama, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    for command in ("prune", "export"):
        capsys.readouterr()
        rc, out = _run(command, src, tmp_path, calib_file)
        line = _one_error(capsys)
        assert rc == 2 and "weights the config does not use" in line and "model.layers.1." in line
        assert not out.exists()


@pytest.fixture(scope="module")
def tiny_llama():
    return make_model("llama")


@pytest.mark.parametrize("case,kw,named", [
    ("one-block", dict(block_count=1), "tensors of block 1, past llama.block_count = 1"),
    ("no-block", dict(block_count=0), "llama.block_count is 0"),
    ("huge", dict(block_count=10**9), "only 2 of the 1000000000 blocks"),
    ("wrong-width", dict(embedding_length=32), "the header's hyperparameters give"),
    ("no-tokenizer", dict(with_tokenizer=False), "has no tokenizer"),
])
@pytest.mark.parametrize("command", ["prune", "ppl", "export"])
def test_a_gguf_whose_header_disagrees_is_refused(tiny_llama, case, kw, named, command, tmp_path, calib_file,
                                                  capsys):
    pytest.importorskip("gguf")
    from gguf_writer import write_llama_gguf

    model, tok = tiny_llama
    path = write_llama_gguf(model, tok, tmp_path / "m.gguf", **kw)
    capsys.readouterr()
    rc, out = _run(command, path, tmp_path, calib_file)
    assert rc == 2
    assert named in _one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_the_loaded_model_is_the_file_not_a_random_fill(llama, tmp_path):
    """The weights esparse loads are the file's, tensor by tensor (nothing re-initialised on the way)."""
    from esparse.converter.model_io import load_model

    model = load_model(llama, dtype=torch.float32)
    stored = load_file(str(llama / "model.safetensors"))
    state = model.state_dict()
    assert set(stored) <= set(state)
    for k, v in stored.items():
        assert torch.equal(state[k], v), k
