"""Exported folders are byte-identical across refactors: the sha256 of every file of a small dense and a small
magnitude-2:4 export is pinned. A change here is a format change: bump FORMAT_VERSION and say so in
docs/format.md.

The pins hold on any x86-64 CPU: the tiny LLaMA/OPT weights are built from fixed integers (helpers.
integer_weights_), not from a random init whose last bits depend on the kernels torch picks for the CPU, and
magnitude chooses its masks from |W| alone (no calibration forward, no floating-point reduction). .ci/run runs
this file a second time under ATEN_CPU_CAPABILITY=default to keep it so. (The pins were re-made when the inputs
became integer-built; the format did not change.)"""

import hashlib

import pytest

from esparse.cli import main

from helpers import save_integer_model

PINNED = {
    ("llama", "dense"): "1ca2799883d49ebf122cd7384b42c1f4224af378613346c90324f20ecc13563e",
    ("llama", "magnitude"): "00f4843abff303e8056e2c013a2fbce3f12899dcec1c973e99d6abe4354b67de",
    ("opt", "dense"): "d271554589af6d919e3e2b83761f809f81d4adb3ac9c8d73fb2d959b38612a28",
    ("opt", "magnitude"): "bff2abe06dce8540b390f239a9fcb4ac813df6f3b0ac41798f90913e22083851",
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
def test_export_bytes_are_pinned(arch, method, tmp_path):
    src = save_integer_model(arch, tmp_path / "src")
    if method != "dense":
        pruned = tmp_path / "pruned"
        assert main(["prune", str(src), "--method", method, "--out", str(pruned), "--device", "cpu"]) == 0
        src = pruned
    assert main(["export", str(src), "--out", str(tmp_path / "ft"), "--dtype", "fp16"]) == 0
    assert _folder_digest(tmp_path / "ft") == PINNED[(arch, method)]
