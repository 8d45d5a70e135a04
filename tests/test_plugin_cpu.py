"""ft_plugin pieces that run without a GPU: the algorithm cache file, padding, the fallback errors."""

import logging

import pytest
import torch

from esparse.converter.errors import EsparseError
from esparse.ft_plugin import build_info
from esparse.ft_plugin.algo_cache import HEADER, AlgoCache, pad_rows, search_bucket


def test_padding_and_buckets():
    assert [pad_rows(m) for m in (1, 3, 8, 16, 17, 333, 2048)] == [16, 16, 16, 16, 32, 336, 2048]
    assert [search_bucket(m) for m in (1, 16, 17, 64, 65, 333, 4096)] == [16, 16, 32, 64, 128, 512, 4096]


def test_cache_roundtrip_and_reuse(tmp_path):
    path = tmp_path / "algos.txt"
    c = AlgoCache(path)
    assert c.get(("H100", "fp16", 16, 4096, 4096)) is None
    c.put(("H100", "fp16", 16, 4096, 4096), 3, 1)
    c.put(("H100", "bf16", 64, 11008, 4096), 7, 2)
    text = path.read_text()
    assert text.startswith(HEADER) and "H100 bf16 64 11008 4096 7 2" in text
    again = AlgoCache(path)  # a later process reads it back
    assert again.get(("H100", "fp16", 16, 4096, 4096)) == (3, 1)
    assert again.get(("H100", "bf16", 64, 11008, 4096)) == (7, 2)


@pytest.mark.parametrize("content", [
    "garbage\n", HEADER + "H100 fp16 16 4096\n", HEADER + "H100 fp8 16 1 1 1 1\n", HEADER + "H100 fp16 x 1 1 1 1\n",
    "# esparse spgemm algorithms v9\n", b"\xff\xfe\x00".decode("latin-1"),
])
def test_corrupt_or_foreign_cache_is_ignored_and_rewritten(tmp_path, caplog, content):
    path = tmp_path / "algos.txt"
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        c = AlgoCache(path)
    assert c.rows == {} and "rewritten" in caplog.text
    c.put(("A100", "fp16", 32, 128, 256), 1, 1)
    assert AlgoCache(path).get(("A100", "fp16", 32, 128, 256)) == (1, 1)


def test_cache_location_env(tmp_path, monkeypatch):
    from esparse.ft_plugin.algo_cache import default_path

    monkeypatch.setenv("ESPARSE_GEMM_CACHE", str(tmp_path / "x.txt"))
    assert default_path() == tmp_path / "x.txt"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_cpu_fallback_errors_name_the_dense_path():
    info = build_info()
    assert not info.built and info.reason
    with pytest.raises(EsparseError, match="unavailable"):
        import esparse.ft_plugin.ops  # noqa: F401
    from esparse.python_api.model import default_backend

    assert default_backend(torch.device("cpu"), sparse=False) == "torch"
    with pytest.raises(EsparseError, match="--dense"):
        default_backend(torch.device("cpu"), sparse=True)
