"""ft_plugin pieces that run without a GPU: the algorithm cache file, padding, the fallback errors."""

import logging

import pytest
import torch

from esparse.errors import EsparseError
from esparse.ft_plugin import build_info
from esparse.ft_plugin.algo_cache import HEADER, AlgoCache, pad_rows, search_bucket


def test_padding_and_buckets():
    assert [pad_rows(m) for m in (1, 3, 8, 16, 17, 333, 2048)] == [16, 16, 16, 16, 32, 336, 2048]
    assert [search_bucket(m) for m in (1, 16, 17, 64, 65, 333, 4096)] == [16, 16, 32, 64, 128, 512, 4096]


K1 = ("H100", "0.10.0", "fp16", 16, 4096, 4096)
K2 = ("H100", "0.10.0", "bf16", 64, 11008, 4096)


def test_cache_roundtrip_and_reuse(tmp_path):
    path = tmp_path / "algos.txt"
    c = AlgoCache(path)
    assert c.get(K1) is None
    c.put(K1, 3, 1)
    c.put(K2, 7, 2)
    text = path.read_text()
    assert text.startswith(HEADER) and "H100 0.10.0 bf16 64 11008 4096 7 2" in text
    again = AlgoCache(path)  # a later process reads it back
    assert again.get(K1) == (3, 1) and again.get(K2) == (7, 2)
    assert again.get(("H100", "0.11.0", "fp16", 16, 4096, 4096)) is None  # ids do not cross versions
    assert not list(tmp_path.glob(".spgemm-*"))


@pytest.mark.parametrize("content", [
    "garbage\n", "# esparse spgemm algorithms v1\nH100 fp16 16 1 1 1 1\n", "# esparse spgemm algorithms v9\n",
    b"\xff\xfe\x00".decode("latin-1"),
])
def test_foreign_cache_is_ignored_and_rewritten(tmp_path, caplog, content):
    path = tmp_path / "algos.txt"
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        c = AlgoCache(path)
    assert c.rows == {} and "rewritten" in caplog.text
    c.put(K1, 1, 1)
    assert AlgoCache(path).rows == {K1: (1, 1)}


@pytest.mark.parametrize("bad", ["H100 0.10.0 fp16 16 4096", "H100 0.10.0 fp8 16 1 1 1 1", "H100 0.10.0 fp16 x 1 1 1 1",
                                 "H100 0.10.0 fp16 16 1 1 -1 1", "H100 0.10.0 fp16 16 1 1 1 -2"])
def test_malformed_rows_are_skipped_and_the_rest_kept(tmp_path, caplog, bad):
    path = tmp_path / "algos.txt"
    path.write_text(HEADER + bad + "\nH100 0.10.0 fp16 16 4096 4096 3 1\n")
    with caplog.at_level(logging.WARNING):
        c = AlgoCache(path)
    assert c.rows == {K1: (3, 1)} and "malformed row 3" in caplog.text


def test_split_k_minus_one_is_a_valid_row(tmp_path):
    # cuSPARSELt 0.10 reports split-k -1 (not used) for most searched algorithms on the H200: such rows stay.
    path = tmp_path / "algos.txt"
    path.write_text(HEADER + "H100 0.10.0 fp16 16 4096 4096 39 -1\n")
    assert AlgoCache(path).rows == {K1: (39, -1)}


def test_failed_cache_write_warns_and_keeps_rows(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    c = AlgoCache(blocker / "algos.txt")  # its parent is a file: every write fails
    with caplog.at_level(logging.WARNING):
        c.put(K1, 3, 1)
    assert c.get(K1) == (3, 1) and "could not write" in caplog.text


def test_concurrent_writers_merge(tmp_path):
    path = tmp_path / "algos.txt"
    a, b = AlgoCache(path), AlgoCache(path)  # two processes that both started before either wrote
    a.put(K1, 3, 1)
    b.put(K2, 7, 2)
    assert AlgoCache(path).rows == {K1: (3, 1), K2: (7, 2)}


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
    from esparse.python_api.loader import default_backend

    assert default_backend(torch.device("cpu"), sparse=False) == "torch"
    with pytest.raises(EsparseError, match="--dense"):
        default_backend(torch.device("cpu"), sparse=True)


def test_plugin_library_found_where_an_editable_install_puts_it(tmp_path, monkeypatch):
    """pip install -e compiles into site-packages/esparse/ft_plugin/ while the package imports from source."""
    from esparse import ft_plugin

    site = tmp_path / "site-packages"
    lib = site / "esparse" / "ft_plugin" / ft_plugin.LIB_NAME
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setattr("sys.path", [str(site)])
    monkeypatch.delenv("ESPARSE_PLUGIN", raising=False)
    assert ft_plugin.library_path() == lib
    monkeypatch.setenv("ESPARSE_PLUGIN", str(tmp_path / "x.so"))
    (tmp_path / "x.so").write_bytes(b"\x7fELF")
    assert ft_plugin.library_path() == tmp_path / "x.so"


def test_cusparselt_choice(tmp_path, monkeypatch):
    from esparse.ft_plugin import cusparselt

    monkeypatch.setenv("ESPARSE_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("ESPARSE_CUSPARSELT", raising=False)
    monkeypatch.setattr(cusparselt, "loaded_in_process", lambda: None)
    assert cusparselt.choose() == ""  # nothing private: the process's own copy
    lib = tmp_path / "data" / "cusparselt" / "nvidia" / "cu13" / "lib" / cusparselt.SONAME
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    versions = {str(lib): (0, 10, 0)}
    monkeypatch.setattr(cusparselt, "library_version", lambda p: versions.get(str(p)))
    assert cusparselt.choose() == str(lib)  # the private 0.10 beats an unknown process copy
    versions[str(lib)] = (0, 8, 1)
    assert cusparselt.choose() == ""  # a private copy that is no better is not used
    own = tmp_path / "torch" / cusparselt.SONAME
    monkeypatch.setattr(cusparselt, "loaded_in_process", lambda: own)
    versions.update({str(own): (0, 11, 0), str(lib): (0, 10, 0)})
    assert cusparselt.choose() == ""  # the process's own copy is good enough
    monkeypatch.setenv("ESPARSE_CUSPARSELT", str(tmp_path / "data"))  # a folder: searched below
    assert cusparselt.choose() == str(lib)
    monkeypatch.setenv("ESPARSE_CUSPARSELT", str(tmp_path / "missing"))
    with pytest.raises(EsparseError, match="ESPARSE_CUSPARSELT"):
        cusparselt.choose()
    assert "install-cusparselt" in cusparselt.install_command()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_env_on_cpu_says_no_gpu(capsys):
    from esparse.cli import main

    assert main(["env"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("esparse ") and "torch" in out[0]
    assert len(out) == 2 and out[1].startswith("GPU: none")


def test_source_digest_names_the_code_not_the_git_metadata(tmp_path):
    """The digest every benchmark JSON carries follows the source files' bytes (a copied tree without .git
    gives the same digest) and changes with one byte of one file."""
    import shutil
    from pathlib import Path

    from esparse.report import SOURCE_DIRS, environment, source_digest

    root = Path(__file__).resolve().parent.parent
    for d in SOURCE_DIRS:
        shutil.copytree(root / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    assert source_digest(tmp_path) == source_digest(root) == environment()["source"]
    f = tmp_path / "converter" / "masks.py"
    f.write_bytes(f.read_bytes() + b"\n")
    assert source_digest(tmp_path) != source_digest(root)
