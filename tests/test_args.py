"""Every number and name on the command line is checked where it enters: one line, exit code 2."""

import json

import pytest

from esparse.cli import main


@pytest.mark.parametrize("argv,flag", [
    (["prune", "M", "--calib", "C", "--out", "O", "--block", "0"], "--block"),
    (["prune", "M", "--calib", "C", "--out", "O", "--iters", "-1"], "--iters"),
    (["prune", "M", "--calib", "C", "--out", "O", "--alpha", "nan"], "--alpha"),
    (["prune", "M", "--calib", "C", "--out", "O", "--batch-size", "0"], "--batch-size"),
    (["prune", "M", "--calib", "C", "--out", "O", "--nsamples", "x"], "--nsamples"),
    (["prune", "M", "--calib", "C", "--out", "O", "--device", "tpu"], "--device"),
    (["prune", "M", "--calib", "C", "--out", "O", "--refine", "-2"], "--refine"),
    (["ppl", "M", "--text", "T", "--seqlen", "1"], "--seqlen"),
    (["ppl", "M", "--text", "T", "--max-windows", "0"], "--max-windows"),
    (["generate", "M", "--prompt", "  "], "--prompt"),
    (["generate", "M", "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["generate", "M", "--prompt", "hi", "--top-p", "-0.1"], "--top-p"),
    (["generate", "M", "--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "M", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["bench", "--shape", "llama-7b", "--batches", "abc"], "--batches"),
    (["bench", "--shape", "llama-7b", "--batches", "1,0"], "--batches"),
])
def test_bad_values_are_one_line_exit_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esparse: error:") and flag in err[0]


@pytest.mark.parametrize("extra,flag", [(["--gns", "serpentine"], "--gns"), (["--refine", "8"], "--refine")])
def test_options_sparsegpt_does_not_take_are_one_line_before_any_work(extra, flag, capsys):
    # the model path does not exist: the option is refused first, in one line
    assert main(["prune", "/nonexistent", "--calib", "C", "--out", "O", "--method", "sparsegpt", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esparse: error: --method sparsegpt") and flag in err[0]


def test_null_text_in_jsonl_is_refused(tmp_path):
    from esparse.converter.text import read_documents
    from esparse.errors import EsparseError

    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(EsparseError, match=r"c.jsonl:2 .*string \"text\""):
        read_documents(f)
