"""Exported folders are byte-identical across refactors: the sha256 of every file of a small dense and a small
magnitude-2:4 export (tiny seeded LLaMA/OPT; magnitude needs no floating-point reduction to choose its mask)
is pinned. A change here is a format change: bump FORMAT_VERSION and say so in docs/format.md."""

import hashlib

import pytest

from esparse.cli import main

from helpers import save_model

PINNED = {
    ("llama", "dense"): "2a5e4e25fd93333e078a487a5e6c2242c4ee7ef8fa5b8bd9e2b230421bd1f4ea",
    ("llama", "magnitude"): "348f8851e417471b66df578771ae20bc5e44b1ddcb599de465b88e736b59211b",
    ("opt", "dense"): "d5ed7585e4476215b0c04124c07619e7dbf5c5b890fa305e53a62b2e3bf86578",
    ("opt", "magnitude"): "fdcf868d38ad360cfe784ddad39c4c7802bd0c26e288b83354acb21483bebe74",
}


def _folder_digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        if p.suffix == ".ini" or p.name.startswith("tokenizer") or p.name == "special_tokens_map.json":
            continue  # config.ini holds the source path; tokenizer files come from the tokenizers library
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("method", ["dense", "magnitude"])
def test_export_bytes_are_pinned(arch, method, tmp_path, calib_file):
    src = save_model(arch, tmp_path / "src", seed=7)
    if method != "dense":
        pruned = tmp_path / "pruned"
        assert main(["prune", str(src), "--method", method, "--calib", str(calib_file), "--out", str(pruned),
                     "--nsamples", "2", "--seqlen", "16", "--device", "cpu"]) == 0
        src = pruned
    assert main(["export", str(src), "--out", str(tmp_path / "ft"), "--dtype", "fp16"]) == 0
    assert _folder_digest(tmp_path / "ft") == PINNED[(arch, method)]
