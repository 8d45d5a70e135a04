"""Hostile inputs: the user's data is never lost, corrupt files are never served, links are never followed."""

import hashlib
import shutil

import pytest
import torch

from esparse.cli import main
from esparse.format.nm_pack import pack_nm, unpack_nm

from helpers import save_model


def _tree_hash(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _prune(model, calib, out, *extra):
    return main(["prune", str(model), "--calib", str(calib), "--out", str(out), "--nsamples", "2",
                 "--seqlen", "16", "--device", "cpu", "--method", "wanda", *extra])


@pytest.mark.parametrize("where", ["same", "parent", "inside", "calib_parent"])
def test_overwrite_never_destroys_an_input(tmp_path, calib_file, where, capsys):
    src = save_model("llama", tmp_path / "models" / "src")
    calib = tmp_path / "text" / "calib.txt"
    calib.parent.mkdir()
    shutil.copy(calib_file, calib)
    out = {"same": src, "parent": src.parent, "inside": src / "pruned", "calib_parent": calib.parent}[where]
    before = (_tree_hash(src), calib.read_bytes())
    capsys.readouterr()
    assert _prune(src, calib, out, "--overwrite") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esparse: error:") and "input" in err[0]
    assert (_tree_hash(src), calib.read_bytes()) == before
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name or p.name.endswith(".old")]


def test_export_onto_its_own_input_is_refused(tmp_path, calib_file, capsys):
    src = save_model("llama", tmp_path / "src")
    pruned = tmp_path / "p"
    assert _prune(src, calib_file, pruned) == 0
    before = _tree_hash(pruned)
    assert main(["export", str(pruned), "--out", str(pruned), "--overwrite"]) == 2
    assert "destroy the input" in capsys.readouterr().err
    assert _tree_hash(pruned) == before


def test_output_that_is_a_file_is_refused_before_work(tmp_path, calib_file, capsys):
    src = save_model("llama", tmp_path / "src")
    f = tmp_path / "file"
    f.write_text("keep me")
    assert _prune(src, calib_file, f, "--overwrite") == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "keep me"


def test_tokenizer_symlink_out_of_the_folder_is_refused(tmp_path, calib_file, capsys):
    secret = tmp_path / "secret_key"
    secret.write_text("PRIVATE")
    src = save_model("llama", tmp_path / "src")
    tok = next(p for p in ("tokenizer.json", "tokenizer_config.json") if (src / p).exists())
    (src / "special_tokens_map.json").unlink(missing_ok=True)
    (src / "special_tokens_map.json").symlink_to(secret)
    assert _prune(src, calib_file, tmp_path / "out") == 2
    assert "symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and tok


def test_corrupt_packed_indices_are_refused_in_memory_and_on_disk(tmp_path, calib_file, capsys):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    w.view(8, 4, 4).scatter_(2, w.view(8, 4, 4).abs().topk(2, -1, largest=False).indices, 0)
    p = pack_nm(w, 2, 4)
    torch.testing.assert_close(unpack_nm(p), w)
    rng = torch.Generator().manual_seed(1)
    refused = 0
    for _ in range(50):  # random corruptions of the index bytes: each either decodes validly or is refused
        bad = p.meta.clone()
        r, c = torch.randint(0, bad.shape[0], (1,), generator=rng).item(), torch.randint(0, bad.shape[1], (1,),
                                                                                           generator=rng).item()
        bad[r, c] ^= int(torch.randint(1, 256, (1,), generator=rng))
        q = type(p)(p.values, bad, 2, 4, 16)
        try:
            out = unpack_nm(q)
        except Exception as e:
            assert "strictly ascending" in str(e)
            refused += 1
            continue
        assert (out != 0).reshape(8, 4, 4).sum(-1).le(2).all()  # a valid but different layout
    assert refused > 10
    # on disk: a meta file with a repeated index in one group is refused by the loader, with its path
    src = save_model("llama", tmp_path / "src")
    assert _prune(src, calib_file, tmp_path / "p") == 0
    assert main(["export", str(tmp_path / "p"), "--out", str(tmp_path / "ft")]) == 0
    meta = sorted((tmp_path / "ft").rglob("*.meta.bin"))[0]
    raw = bytearray(meta.read_bytes())
    raw[0] = 0b0000  # positions (0, 0) in the first group of row 0
    meta.write_bytes(bytes(raw))
    from esparse.errors import EsparseError

    from helpers import load_ft

    with pytest.raises(EsparseError, match="does not match its sha256"):  # the checksum catches it first
        load_ft(tmp_path / "ft")
    from esparse.format.ft_format import read_manifest, write_checksums

    write_checksums(meta.parent, list(read_manifest(meta.parent)))  # sums redone: the index check still refuses it
    with pytest.raises(EsparseError, match="meta.bin: row 0, group 0"):
        load_ft(tmp_path / "ft")


@pytest.mark.parametrize("sig,after", [("SIGTERM", 2.5), ("SIGTERM", 4.0), ("SIGTERM", 6.0), ("SIGINT", 3.0),
                                       ("SIGINT", 5.0)])
def test_a_signal_during_prune_leaves_nothing_behind(tmp_path, calib_file, sig, after):
    src = save_model("llama", tmp_path / "src", num_hidden_layers=4)
    out = tmp_path / "out"
    _signal_run(tmp_path, ["prune", str(src), "--calib", str(calib_file), "--out", str(out), "--nsamples", "8",
                           "--seqlen", "64", "--device", "cpu"], sig, after, out, "esparse.json")


@pytest.mark.parametrize("sig,after", [("SIGTERM", 2.0), ("SIGINT", 2.0), ("SIGTERM", 3.5)])
def test_a_signal_during_export_leaves_nothing_behind(tmp_path, sig, after):
    src = save_model("llama", tmp_path / "src", num_hidden_layers=8, hidden_size=256, intermediate_size=512)
    out = tmp_path / "out"
    _signal_run(tmp_path, ["export", str(src), "--out", str(out), "--dtype", "fp32"], sig, after, out,
                "1-gpu/config.ini")


def _signal_run(tmp_path, argv, sig, after, out, marker) -> None:
    """Run ``esparse argv``, send ``sig`` after ``after`` s: the source is untouched and either the finished
    output (renamed into place when complete, ``marker`` inside) or nothing is left, no hidden folders."""
    import signal
    import subprocess
    import sys
    import time

    before = {p: p.read_bytes() for p in (tmp_path / "src").rglob("*") if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-m", "esparse.cli", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(after)
    proc.send_signal(getattr(signal, sig))
    rc = proc.wait(60)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    signum = getattr(signal, sig)
    assert rc in (0, 128 + signum, -signum, 1 if sig == "SIGINT" else 0), rc  # done, unwound, or killed
    if out.exists():
        assert (out / marker).is_file()
    else:
        assert rc != 0
    assert {p: p.read_bytes() for p in (tmp_path / "src").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("damage", ["out_of_range", "short", "repeat", "extra_key", "missing"])
def test_bad_permutations_are_refused_at_export(tmp_path, calib_file, damage, capsys):
    from safetensors.torch import load_file, save_file

    src = save_model("llama", tmp_path / "src")
    pruned = tmp_path / "p"
    assert main(["prune", str(src), "--calib", str(calib_file), "--out", str(pruned), "--nsamples", "2",
                 "--seqlen", "16", "--device", "cpu"]) == 0
    f = pruned / "esparse_perms.safetensors"
    perms = load_file(str(f))
    key = sorted(perms)[0]
    p = perms[key].clone()
    if damage == "missing":  # the masks are N:M only in the shuffled order: name the file, not "not 2:4"
        f.unlink()
    elif damage == "out_of_range":
        p[0] = p.numel() + 5
    elif damage == "short":
        p = p[:-1].clone()
    elif damage == "repeat":
        p[1] = p[0]
    else:
        perms["layers.99.attn_in"] = p.clone()
    if damage != "missing":
        perms[key] = p
        save_file(perms, str(f))
    capsys.readouterr()
    assert main(["export", str(pruned), "--out", str(tmp_path / "ft")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (progress bars aside)
    assert len(err) == 1 and err[0].startswith("esparse: error:") and "esparse_perms.safetensors" in err[0]
    assert not (tmp_path / "ft").exists()


def test_a_calibration_folder_is_named_as_a_folder(tmp_path, capsys):
    src = save_model("llama", tmp_path / "src")
    (tmp_path / "texts").mkdir()
    capsys.readouterr()
    assert main(["prune", str(src), "--calib", str(tmp_path / "texts"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder: give one text file" in err[0] and not (tmp_path / "o").exists()


def test_cpu_prune_keeps_the_source_dtype(tmp_path, calib_file):
    src = save_model("llama", tmp_path / "src", dtype=torch.float16)
    assert _prune(src, calib_file, tmp_path / "p") == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "config_list", "config_not_utf8",
                                    "config_wrong_types"])
def test_corrupt_model_files_are_one_clear_error(tmp_path, calib_file, damage, capsys):
    src = save_model("llama", tmp_path / "src")
    st = src / "model.safetensors"
    cfg = src / "config.json"
    if damage == "truncated":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif damage == "random":
        st.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                       .to(torch.uint8).numpy().tobytes())
    elif damage == "empty":
        st.write_bytes(b"")
    elif damage == "config_list":
        cfg.write_text("[1, 2]")
    elif damage == "config_not_utf8":
        cfg.write_bytes(b"\xff\xfe{")
    else:
        import json

        c = json.loads(cfg.read_text())
        c["hidden_size"] = "wide"
        cfg.write_text(json.dumps(c))
    capsys.readouterr()
    assert _prune(src, calib_file, tmp_path / "out") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert err and err[-1].startswith("esparse: error:") and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_flipped_byte_in_an_exported_file_is_caught_at_load(tmp_path, calib_file):
    from esparse.errors import EsparseError
    from esparse.format.ft_format import CHECKSUMS_FILE

    from helpers import load_ft

    src = save_model("llama", tmp_path / "src")
    assert _prune(src, calib_file, tmp_path / "p") == 0
    assert main(["export", str(tmp_path / "p"), "--out", str(tmp_path / "ft")]) == 0
    folder = next((tmp_path / "ft").glob("*-gpu"))
    assert (folder / CHECKSUMS_FILE).is_file()
    load_ft(tmp_path / "ft")  # intact: loads
    for victim in (sorted(folder.glob("*.values.bin"))[0], sorted(folder.glob("*layernorm*.bin"))[0]):
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        victim.write_bytes(bytes(raw))
        with pytest.raises(EsparseError, match="does not match its sha256"):
            load_ft(tmp_path / "ft")
        raw[len(raw) // 2] ^= 0x10
        victim.write_bytes(bytes(raw))
    (folder / CHECKSUMS_FILE).write_text("garbage\n")
    with pytest.raises(EsparseError, match="manifest is corrupt"):
        load_ft(tmp_path / "ft")


def test_a_pattern_the_model_cannot_take_is_refused_before_loading(tmp_path, calib_file, capsys, monkeypatch):
    from esparse.converter import pipeline

    src = save_model("llama", tmp_path / "src")
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    capsys.readouterr()
    assert main(["prune", str(src), "--calib", str(calib_file), "--out", str(tmp_path / "o"), "--pattern", "2:3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not divisible by M=3" in err[0]


def test_a_signal_waits_for_the_folder_swap(tmp_path):
    """SIGTERM during the few file operations that create, swap in or remove an output folder is held until they
    are done, then unwinds; SIGTERM while the folder is being written unwinds at once, leaving the old output
    untouched and no temporary folder."""
    import os
    import signal

    from esparse import signals
    from esparse.converter import fsutil

    previous = signal.signal(signal.SIGTERM, signals.on_signal)
    try:
        reached_end = False
        with pytest.raises(SystemExit) as e:
            with signals.signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(10000))  # the handler runs here and only records it
                reached_end = True
        assert reached_end and e.value.code == 128 + signal.SIGTERM
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "old.txt").write_text("old")
        (tmp_path / "out" / fsutil.MARKER).write_text(fsutil.MARKER_TEXT)  # an earlier esparse output
        with pytest.raises(SystemExit):
            with fsutil.atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
                (tmp / "new.txt").write_text("new")
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(10000))
                raise AssertionError("the signal should have unwound the writer")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [fsutil.MARKER, "old.txt"]
    finally:
        signal.signal(signal.SIGTERM, previous)
