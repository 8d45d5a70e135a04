"""Exported folders are byte-identical across refactors: the sha256 of every file of a small dense and a small
magnitude-2:4 export (tiny seeded LLaMA/OPT; magnitude needs no floating-point reduction to choose its mask)
is pinned. A change here is a format change: bump FORMAT_VERSION and say so in docs/format.md."""

import hashlib

import pytest

from esparse.cli import main

from helpers import save_model

PINNED = {
    ("llama", "dense"): "f6459742f45b81bd25afa307a114f3b637c98e8f2e66e589c64634afeea4cd49",
    ("llama", "magnitude"): "39d8fb2ad9061750880093b5e2ec64b7e9ca55cc767b9c6bcf4902fe3e762c8b",
    ("opt", "dense"): "079c62fa6e8b3be505d9c7cd3054565bc6e94e1763af98c09e53ffc7aefe7169",
    ("opt", "magnitude"): "416474badda937edffcee561412cb23c4fa304dd3a3a06a489dea9bb16346436",
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
