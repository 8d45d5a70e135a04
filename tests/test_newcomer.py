"""A newcomer's first hour (issue 19): each friction found on a fresh CPU machine, held by a test."""

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from esparse.cli import _stopped_line, build_parser, main
from esparse.converter.masks import is_nm_sparse, nm_mask
from esparse.converter.ppl import perplexity
from esparse.converter.prune import PruneConfig, prune_model
from esparse.converter.text import eval_windows, read_documents, read_eval_text, read_rows
from esparse.demo import show_generation
from esparse.errors import EsparseError

from helpers import make_model, make_tokenizer, save_model


def _subparsers() -> argparse._SubParsersAction:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))


def _subparser(name: str) -> argparse.ArgumentParser:
    return _subparsers().choices[name]


# 1. the demo's generation is plain text, the continuation on its own line
def test_generation_is_shown_as_text_not_a_repr():
    out = show_generation("torch CPU", "The history of the city begins", " to display 'x'\nand more")
    assert out.splitlines() == ["  [torch CPU]",
                                "  prompt:       The history of the city begins",
                                "  continuation: to display 'x'",
                                "                and more"]
    assert "nothing" in show_generation("torch CPU", "p", "  ")


# 2. the export summary appears once (printed by the CLI; the library logs it at debug level)
def test_export_summary_is_shown_once(tmp_path, capsys, caplog):
    src = save_model("llama", tmp_path / "src")
    with caplog.at_level(logging.INFO):
        assert main(["export", str(src), "--out", str(tmp_path / "ft")]) == 0
    shown = capsys.readouterr().out + "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert shown.count("linears: dense") == 1


# 3. the progress bar names the stage a method really runs
@pytest.mark.parametrize("method,label,absent", [("wanda", "mask attn_in", "shuffle"),
                                                 ("esparse", "shuffle attn_in", None)])
def test_progress_names_the_stage_the_method_runs(method, label, absent, capsys):
    model, _ = make_model("llama")
    calib = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    res = prune_model(model, calib, PruneConfig.for_method(method), "cpu")
    err = capsys.readouterr().err
    assert label in err and (absent is None or absent not in err)
    assert ("shuffle" in res.stage_seconds) == (method == "esparse")


# 4. magnitude needs no calibration text and runs no calibration forward
def test_magnitude_runs_without_calibration(tmp_path, monkeypatch, capsys):
    src = save_model("llama", tmp_path / "src")
    monkeypatch.setattr("esparse.converter.prune.capture_layer0_inputs",
                        lambda *a, **k: pytest.fail("magnitude ran a calibration forward"))
    out = tmp_path / "mag"
    assert main(["prune", str(src), "--method", "magnitude", "--out", str(out), "--device", "cpu"]) == 0
    meta = json.loads((out / "esparse.json").read_text())
    assert meta["calibration"] is None and "forward" not in meta["stage_seconds"]
    w = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    ws = load_file(str(src / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(w != 0, nm_mask(ws.abs(), 2, 4))
    capsys.readouterr()
    assert main(["prune", str(src), "--method", "wanda", "--out", str(tmp_path / "w"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esparse: error: --method wanda") and "--calib TEXT" in err[0]
    assert not (tmp_path / "w").exists()


# 5. --help shows the defaults and a line for every option; --calib names the formats it reads
@pytest.mark.parametrize("command", ["prune", "ppl", "bench", "demo"])
def test_every_option_has_help(command):
    p = _subparser(command)
    assert all(a.help for a in p._actions), [a.dest for a in p._actions if not a.help]


def test_prune_help_shows_defaults_and_formats():
    text = " ".join(_subparser("prune").format_help().split())
    for shown in ("(default: 128)", "(default: 2048)", "(default: esparse)", "(default: 2:4)", "(default: 0)",
                  "<doc ...>-tagged", "JSON lines", "every method but magnitude"):
        assert shown in text, shown


# 6. the model is named as it is: the instruct variant, a dequantized Q4_1 GGUF
def test_the_demo_names_the_model_as_it_is():
    texts = [build_parser().epilog, next(c.help for c in _subparsers()._choices_actions if c.dest == "demo")]
    assert all("SmolLM2-135M-Instruct" in t and "Q4_1" in t for t in texts)


# 8. esparse.json says whether the stored weights are N:M, and what to apply when they are not
@pytest.mark.parametrize("method,as_stored", [("esparse", False), ("wanda", True)])
def test_pruned_folder_says_whether_its_stored_order_is_nm(tmp_path, calib_file, method, as_stored):
    src = save_model("llama", tmp_path / "src")
    out = tmp_path / method
    assert main(["prune", str(src), "--method", method, "--calib", str(calib_file), "--out", str(out),
                 "--nsamples", "2", "--seqlen", "16", "--device", "cpu"]) == 0
    note = json.loads((out / "esparse.json").read_text())["channel_order"]
    weights = load_file(str(out / "model.safetensors"))
    perms = load_file(str(out / "esparse_perms.safetensors"))
    q = weights["model.layers.1.self_attn.q_proj.weight"]
    assert note["nm_in_stored_order"] is as_stored and is_nm_sparse(q, 2, 4) is as_stored
    if not as_stored:  # what the note says to apply makes it N:M
        assert "esparse_perms.safetensors" in note["how"] and "W[:, P]" in note["how"]
        assert is_nm_sparse(q[:, perms["layers.1.attn_in"].long()], 2, 4)


# 9. output files get the modes of any file the user makes (0600 from safetensors before)
def test_outputs_are_readable_like_any_file(tmp_path, calib_file):
    src = save_model("llama", tmp_path / "src")
    assert main(["prune", str(src), "--method", "magnitude", "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    assert main(["export", str(tmp_path / "p"), "--out", str(tmp_path / "ft")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    files = [f for d in ("p", "ft") for f in (tmp_path / d).rglob("*") if f.is_file()]
    assert any(f.name == "model.safetensors" for f in files) and any(f.name == "esparse_perms.safetensors"
                                                                      for f in files)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o666 & ~umask) for f in files}


# 10. bench writes into esparse's cache unless told otherwise, never into the working directory
@pytest.mark.parametrize("given", ["shape", "folder"])
def test_bench_output_defaults_to_the_cache(tmp_path, monkeypatch, given):
    seen = {}
    monkeypatch.setenv("ESPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("esparse.python_api.bench.run_bench", lambda args: seen.setdefault("out", args.out))
    (tmp_path / "ft").mkdir()
    argv = ["bench", "--shape", "smollm2-135m"] if given == "shape" else ["bench", str(tmp_path / "ft")]
    assert main([*argv, "--backends", "torch"]) == 0
    assert seen.pop("out") == tmp_path / "cache" / "bench" / ("smollm2-135m" if given == "shape" else "ft")
    assert main([*argv, "--out", str(tmp_path / "mine")]) == 0 and seen["out"] == tmp_path / "mine"
    assert not (tmp_path / "results").exists()


# 11. --threads reaches torch; ppl reports its progress while it runs
def test_threads_option_sets_torchs_threads(tmp_path, monkeypatch):
    src = save_model("llama", tmp_path / "src")
    text = tmp_path / "t.txt"
    text.write_text("the lazy dog jumps over the quick brown fox . " * 40)
    seen = []
    real = perplexity
    monkeypatch.setattr("esparse.converter.ppl.perplexity",
                        lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    before = torch.get_num_threads()
    try:
        assert main(["ppl", str(src), "--text", str(text), "--seqlen", "32", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
    with pytest.raises(SystemExit):
        main(["prune", str(src), "--out", str(tmp_path / "o"), "--threads", "0"])


def test_perplexity_logs_progress_per_window(caplog):
    model, _ = make_model("llama")
    windows = torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="esparse.converter.ppl"):
        ppl = perplexity(model, windows, log_every_s=0.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "esparse.converter.ppl"]
    assert [ln.split(",")[0] for ln in lines] == ["ppl: window 1/3", "ppl: window 2/3", "ppl: window 3/3"]
    assert f"perplexity so far {ppl:.3f}" in lines[-1]


# 12. a prune stopped by a signal says so in one line (and still leaves nothing partial)
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stopped_prune_says_so(tmp_path, calib_file, sig):
    # about 8 s of pruning after the calibration windows are drawn (2-core CPU): the signal comes well before
    src = save_model("llama", tmp_path / "src", num_hidden_layers=8, hidden_size=256, intermediate_size=512)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "esparse.cli", "prune", str(src), "--calib", str(calib_file),
                             "--out", str(out), "--nsamples", "16", "--seqlen", "64", "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "calibration:" not in seen:  # the model is loaded and the windows drawn: pruning starts now
        line = proc.stderr.readline()
        assert line, f"prune ended before calibration: {seen}"
        seen += line
    proc.send_signal(getattr(signal, sig))
    err = proc.communicate(timeout=120)[1]
    signum = getattr(signal, sig)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 128 + signum and "Traceback" not in err
    assert last == f"esparse: prune stopped by {sig} before {out} was complete: nothing was written; run it again " \
                   "to finish"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_signal_after_the_swap_is_reported_as_complete(tmp_path):
    started = time.time()
    (tmp_path / "out").mkdir()
    assert "nothing was written" not in _stopped_line("prune", signal.SIGTERM, tmp_path / "out", started)
    (tmp_path / "out" / "esparse.json").write_text("{}")
    assert _stopped_line("prune", signal.SIGTERM, tmp_path / "out", started) == \
        f"esparse: prune stopped by SIGTERM after {tmp_path / 'out'} was written complete"
    os.utime(tmp_path / "out" / "esparse.json", (started - 60, started - 60))  # an older run's folder
    assert "previous contents are untouched" in _stopped_line("prune", signal.SIGTERM, tmp_path / "out", started)


# --eval-join rows: the Wanda/SparseGPT WikiText-2 string
def test_eval_join_rows_is_the_wanda_sparsegpt_string(tmp_path):
    raw = tmp_path / "wiki.test.raw"  # the raw split's layout: blank rows of one space, CRLF here
    raw.write_bytes(b" \r\n = Title = \r\n \r\n First row . \r\n Second row . \r\n \r\n = = Part = = \r\n")
    # what `"\n\n".join(load_dataset(...)["text"])` gives for these seven rows, written out by hand
    assert "\n\n".join(read_rows(raw)) == ("\n\n = Title = \n\n\n\n\n First row . \n\n\n Second row . \n\n\n\n"
                                           "\n = = Part = = \n")
    assert "\n\n".join(read_documents(raw)) == " = Title = \n\n First row . \n\n Second row . \n\n = = Part = = "
    rows = tmp_path / "rows.jsonl"  # a JSON-lines export of the rows: taken as they are, empty ones included
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", " = Title = \n", "", " First row . \n"]))
    assert read_rows(rows) == ["", " = Title = \n", "", " First row . \n"]
    assert read_eval_text(rows, "documents") == [" = Title = \n", " First row . \n"]
    with pytest.raises(EsparseError, match="--eval-join"):
        read_eval_text(rows, "paper")
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n")
    with pytest.raises(EsparseError, match="empty"):
        read_rows(blank)


def test_ppl_eval_join_changes_the_tokens_and_says_which(tmp_path, capsys):
    src = save_model("llama", tmp_path / "src")
    text = tmp_path / "t.raw"
    text.write_text(" \n = A title = \n \n" + " the quick brown fox jumps over the lazy dog . \n" * 30)
    tok = make_tokenizer()
    docs, rows = (eval_windows(tok, read_eval_text(text, j), 16) for j in ("documents", "rows"))
    assert not torch.equal(docs[0], rows[0])  # the rows keep their newlines and the blank rows
    got = {}
    for join in ("documents", "rows"):
        assert main(["ppl", str(src), "--text", str(text), "--seqlen", "16", "--eval-join", join]) == 0
        got[join] = capsys.readouterr().out
        assert f"--eval-join {join}" in got[join]
    assert got["documents"].split()[1] != got["rows"].split()[1]
