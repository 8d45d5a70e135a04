"""Issue 24, class 3: limits checked before allocation. A request that cannot fit (calibration samples beyond the
text or the memory, a KV cache, a model of 10^5 layers, a position count of 10^12, a text over the size limit) is
one error line that names the limit, found at once, never an out-of-memory kill or a hang; a large text is
tokenised in bounded chunks."""

import time

import pytest
import torch

from esparse import limits
from esparse.cli import main
from esparse.converter import text

from helpers import make_model, one_error, save_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_model("llama", tmp_path_factory.mktemp("lim") / "llama")


def _prune(src, calib, out, *extra):
    return main(["prune", str(src), "--calib", str(calib), "--out", str(out), "--seqlen", "16", "--device", "cpu",
                 *extra])


def test_more_samples_than_the_text_holds_is_refused(llama, tmp_path, calib_file, capsys):
    from esparse.converter.text import calibration_windows, read_documents
    from esparse.errors import EsparseError

    _, tok = make_model("llama")
    with pytest.raises(EsparseError, match="is more than the .* distinct windows of 16 tokens"):
        calibration_windows(tok, read_documents(calib_file), 10**7, 16)
    t0 = time.perf_counter()
    capsys.readouterr()
    assert _prune(llama, calib_file, tmp_path / "out", "--nsamples", "10000000") == 2
    line = one_error(capsys)  # the calibration activations' memory, or else the text's distinct windows
    assert "--nsamples 10000000" in line and "lower --nsamples" in line
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "out").exists()


def test_calibration_activations_that_cannot_fit_are_refused(llama, tmp_path, calib_file, capsys, monkeypatch):
    monkeypatch.setattr(limits, "free_memory", lambda device: 1 << 10)  # 1 KiB free
    capsys.readouterr()
    assert _prune(llama, calib_file, tmp_path / "out", "--nsamples", "8") == 2
    line = one_error(capsys)
    assert "calibration activations of --nsamples 8 x --seqlen 16 (hidden size 64) need 0.1 MiB" in line
    assert "lower --nsamples or --seqlen" in line and not (tmp_path / "out").exists()


def test_a_model_of_100000_layers_is_refused_before_it_is_built(tmp_path, capsys):
    t0 = time.perf_counter()
    capsys.readouterr()
    assert main(["bench", "--shape", "llama-7b", "--layers", "100000", "--backends", "torch",
                 "--out", str(tmp_path / "b")]) == 2
    line = one_error(capsys)
    assert "the 100000-layer model's weights need" in line and "GiB free" in line
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "b").exists()


def test_a_kv_cache_that_cannot_fit_is_refused(tmp_path, capsys, monkeypatch):
    src = save_model("llama", tmp_path / "src", max_position_embeddings=1 << 20)
    assert main(["export", str(src), "--out", str(tmp_path / "ft"), "--dtype", "fp32"]) == 0
    monkeypatch.setattr(limits, "free_memory", lambda device: 8 << 20)  # the weights fit, a 10^5-token cache not
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "ft"), "--prompt", "the fox", "--max-new-tokens", "100000",
                 "--device", "cpu"]) == 2
    line = one_error(capsys)
    assert "the KV cache of 1 x 10000" in line and "lower --max-new-tokens" in line
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "ft"), "--prompt", "the fox", "--max-new-tokens", str(1 << 20),
                 "--device", "cpu"]) == 2
    assert "exceed the model's 1048576 positions" in one_error(capsys)


def test_a_position_count_of_10_12_in_config_ini_is_refused(tmp_path, capsys):
    from esparse.format.ft_format import read_manifest, write_checksums

    src = save_model("llama", tmp_path / "src")
    assert main(["export", str(src), "--out", str(tmp_path / "ft")]) == 0
    folder = tmp_path / "ft" / "1-gpu"
    ini = (folder / "config.ini").read_text()
    (folder / "config.ini").write_text(ini.replace("max_pos_seq_len = 128", f"max_pos_seq_len = {10**12}"))
    write_checksums(folder, list(read_manifest(folder)))  # even with the checksums redone
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "ft"), "--prompt", "the fox", "--device", "cpu"]) == 2
    assert f"max_pos_seq_len = {10**12} is over esparse's limit of 16777216 positions" in one_error(capsys)


def test_a_text_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from pathlib import Path

    from esparse.errors import EsparseError

    big = tmp_path / "big.txt"
    big.write_text("word " * 1000)
    monkeypatch.setattr(text, "MAX_TEXT_BYTES", 1000)
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("the text was read"))
    with pytest.raises(EsparseError, match="big.txt is 0.0 GiB, over esparse's limit"):
        text.read_documents(big)


def test_a_large_text_is_tokenised_in_bounded_chunks(monkeypatch):
    _, tok = make_model("llama")
    docs = [f"document {i}: the quick brown fox jumps over the lazy dog " * 3 for i in range(60)]
    one_call = text.tokenize_stream(tok, docs)  # below the chunk size: one call, as before
    assert one_call.tolist() == tok("\n\n".join(docs)).input_ids
    calls = []

    def spy(s, **kw):
        calls.append(len(s))
        return tok(s, **kw)

    monkeypatch.setattr(text, "ONE_CALL_CHARS", 1000)
    monkeypatch.setattr(text, "TOKENIZE_CHUNK_CHARS", 1000)
    chunked = text.tokenize_stream(spy, docs)
    longest = max(map(len, docs))
    assert len(calls) > 5 and max(calls) <= 1000 + longest + 2
    # the chunks cover the same text: the same tokens but at the chunk seams
    assert abs(chunked.numel() - one_call.numel()) <= len(calls)
    assert tok.decode(chunked) == tok.decode(one_call)


def test_a_long_text_is_tokenised_only_as_far_as_calibration_needs(monkeypatch):
    _, tok = make_model("llama")
    docs = [f"document {i}: the quick brown fox jumps over the lazy dog " * 3 for i in range(200)]
    monkeypatch.setattr(text, "ONE_CALL_CHARS", 1000)
    monkeypatch.setattr(text, "TOKENIZE_CHUNK_CHARS", 1000)
    whole = text.tokenize_stream(tok, docs)
    capped = text.tokenize_stream(tok, docs, max_tokens=500)
    assert 500 <= capped.numel() < whole.numel() // 4 and torch.equal(capped, whole[: capped.numel()])
    windows = text.eval_windows(tok, docs, 16, max_windows=3)
    assert torch.equal(windows.reshape(-1), whole[:48])
