"""Tensor parallelism on the CPU (gloo): per-rank shards, torchrun runs against the one-process run, failures.

Every launched process listens on loopback only (MASTER_ADDR=127.0.0.1, a free port), runs under a bounded
timeout in its own session, and is killed with that session when the test ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from esparse.cli import main
from esparse.converter.masks import is_nm_sparse
from esparse.errors import EsparseError
from esparse.format.ft_format import linear_specs, read_config
from esparse.format.ft_loader import FTFolder
from esparse.format.ft_shard import FTShard, local_config, rank_files
from esparse.format.nm_pack import PackedNM
from esparse.python_api import distributed, load_decoder

from helpers import save_model

HERE = Path(__file__).parent
ESPARSE = str(Path(sys.executable).parent / "esparse")  # the console script, as `command -v esparse` finds it
LAUNCH_TIMEOUT_S = 240  # a whole launch, on a loaded 2-core machine


@pytest.fixture(scope="module")
def exports(tmp_path_factory, calib_file) -> dict[str, Path]:
    """tp=2 exports (fp32): LLaMA with grouped-query attention (4 heads, 2 kv heads: one kv head per rank)
    pruned 2:4 by E-Sparse with its global channel shuffle (every group permuted; the local search is left out
    for time), OPT dense, OPT pruned 2:4 (biases, row-parallel ones too)."""
    root = tmp_path_factory.mktemp("tp")
    out = {}
    llama_how = ["--gns", "serpentine", "--lbs", "off", "--refine", "0"]  # the global shuffle is no longer a default
    for arch, how in (("llama", llama_how), ("opt", ["--method", "magnitude"])):
        src = save_model(arch, root / arch)
        pruned = root / f"{arch}-pruned"
        assert main(["prune", str(src), "--calib", str(calib_file), "--out", str(pruned), "--nsamples", "2",
                     "--seqlen", "16", "--device", "cpu", *how]) == 0
        out[f"{arch}-src"] = src
        for name, folder in (("pruned", pruned), ("dense", src)):
            if f"{arch}-{name}" == "llama-dense":
                continue
            assert main(["export", str(folder), "--out", str(root / f"ft-{arch}-{name}"), "--tp", "2",
                         "--dtype", "fp32"]) == 0
            out[f"{arch}-{name}"] = root / f"ft-{arch}-{name}"
    return out


FOLDERS = ("llama-pruned", "opt-dense", "opt-pruned")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(port: int, rank: int | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **extra}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    if rank is not None:  # started by the test itself, as torchrun would
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    return env


@dataclasses.dataclass
class Proc:
    popen: subprocess.Popen
    out: Path
    err: Path

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


@contextlib.contextmanager
def launched(tmp_path: Path, *runs: tuple[list[str], dict[str, str]]):
    """Start each (argv, env) in its own session; on the way out kill every session still alive."""
    procs = []
    try:
        for i, (argv, env) in enumerate(runs):
            out, err = tmp_path / f"p{i}.out", tmp_path / f"p{i}.err"
            with open(out, "w") as fo, open(err, "w") as fe:
                procs.append(Proc(subprocess.Popen(argv, env=env, stdout=fo, stderr=fe, cwd=tmp_path,
                                                   start_new_session=True), out, err))
        yield procs
    finally:
        for p in procs:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()


def torchrun(*args: str, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(port), *args]


def ranks(argv: list[str], port: int, **extra: str) -> list[tuple[list[str], dict[str, str]]]:
    """Both ranks started directly (no torchrun agent to stop the survivors: what they do alone is tested)."""
    return [(argv, _env(port, r, **extra)) for r in (0, 1)]


def _wait_for(paths: list[Path], procs: list[Proc], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not all(p.is_file() for p in paths):
        dead = [p for p in procs if p.popen.poll() is not None]
        assert not dead and time.monotonic() < end, [p.stderr for p in procs]
        time.sleep(0.1)


# --- per-rank reading ---------------------------------------------------------------------------------------


def _dense(w) -> torch.Tensor:
    return w.to_dense() if isinstance(w, PackedNM) else w


def test_rank_shards_reassemble_the_folder_and_stay_24(exports):
    """Each rank's tensors are its slices of the merged (one-device) model: per fused segment for column-parallel
    linears, input columns for row-parallel ones; row biases on rank 0 only; lm_head by vocabulary blocks."""
    for name in FOLDERS:
        merged = FTFolder(exports[name], 2)
        cfg = merged.cfg
        assert name != "llama-pruned" or len(cfg.permuted) == 4
        shards = [FTShard(exports[name], 2, r) for r in range(2)]
        local = shards[0].cfg
        assert (local.n_heads, local.n_kv, local.inter, local.hidden) == (cfg.n_heads // 2, cfg.n_kv // 2,
                                                                         cfg.inter // 2, cfg.hidden)
        mine = rank_files(cfg, 0)
        assert not any(".1.bin" in f or ".1.values" in f or ".1.meta" in f for f in mine) and len(mine) > 10
        for i in range(cfg.n_layers):
            whole, parts = merged.layer(i), [s.layer(i) for s in shards]
            for spec in linear_specs(cfg, i):
                got = [_dense(p.linears[spec.name]) for p in parts]
                if cfg.nm:
                    assert all(isinstance(p.linears[spec.name], PackedNM) for p in parts)
                    assert all(is_nm_sparse(g, 2, 4) for g in got)
                if spec.parallel == "col":
                    segs = [torch.cat(s, 0) for s in zip(*(g.split([n // 2 for n in spec.segments]) for g in got))]
                    assert torch.equal(torch.cat(segs, 0), _dense(whole.linears[spec.name])), spec.name
                else:
                    assert torch.equal(torch.cat(got, 1), _dense(whole.linears[spec.name])), spec.name
                if spec.bias and spec.parallel == "row":
                    assert torch.equal(parts[0].biases[spec.bias_name], whole.biases[spec.bias_name])
                    assert not parts[1].biases[spec.bias_name].any()
                elif spec.bias:
                    b = [p.biases[spec.bias_name].split([n // 2 for n in spec.segments]) for p in parts]
                    assert torch.equal(torch.cat([torch.cat(s) for s in zip(*b)]), whole.biases[spec.bias_name])
            assert all(torch.equal(p.perms[g], whole.perms[g]) for p in parts for g in whole.perms)
        head = torch.cat([s.model_tensors()["model.lm_head.weight"] for s in shards])
        assert torch.equal(head[: cfg.vocab], merged.model_tensors()["model.lm_head.weight"])
        assert not head[cfg.vocab :].any()


def test_a_rank_checks_and_reads_only_its_own_shard(exports, tmp_path):
    folder = tmp_path / "ft"
    shutil.copytree(exports["llama-pruned"], folder)
    victim = folder / "2-gpu" / "model.layers.1.mlp.down_proj.weight.1.values.bin"
    data = bytearray(victim.read_bytes())
    data[7] ^= 0xFF
    victim.write_bytes(bytes(data))
    FTShard(folder, 2, 0).layer(1)  # rank 0 neither hashes nor reads rank 1's file
    with pytest.raises(EsparseError, match="does not match its sha256"):
        FTShard(folder, 2, 1)
    with pytest.raises(EsparseError, match="does not match its sha256"):
        FTFolder(folder, 2)  # the one-device loader reads every rank's files
    victim.unlink()
    FTShard(folder, 2, 0)
    with pytest.raises(EsparseError, match="is missing"):
        FTShard(folder, 2, 1)


def test_fewer_kv_heads_than_ranks_are_refused_not_replicated(exports, tmp_path, capsys):
    cfg = read_config(exports["llama-pruned"] / "2-gpu" / "config.ini")
    assert cfg.n_kv == 2 and cfg.n_heads == 4
    with pytest.raises(EsparseError, match=r"tp 4 does not divide the 2 key/value heads .*use --tp 2 or fewer"):
        local_config(dataclasses.replace(cfg, tp=4))
    assert local_config(cfg).n_kv == 1
    assert main(["export", str(exports["llama-src"]), "--out", str(tmp_path / "tp4"), "--tp", "4"]) == 2  # nor exported
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (transformers' progress bar)
    assert len(err) == 1 and "does not divide kv_head_num = 2" in err[0]


def test_launch_mistakes_are_one_line_from_rank_0(monkeypatch, exports, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(EsparseError, match="torchrun started 2 processes but --tp is 4: launch with --nproc-per-node"):
        distributed.start(4, "cpu")
    with pytest.raises(EsparseError, match="--device cuda:1 with --tp: each rank takes cuda:<LOCAL_RANK>"):
        distributed.start(2, "cuda:1")
    monkeypatch.setenv("RANK", "1")  # the same mistake on another rank: said once, by rank 0
    with pytest.raises(distributed.ReportedByRank0) as e:
        distributed.start(4, "cpu")
    assert e.value.code == 2
    monkeypatch.delenv("WORLD_SIZE")
    assert distributed.start(2, "cpu") is None  # not launched as ranks: --tp 2 merges the shards
    assert main(["bench", str(exports["opt-dense"]), "--tp", "2", "--backends", "torch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "launch it with torchrun --nproc-per-node 2" in err[0]


# --- runs over two processes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-pruned", "opt-dense"])
def test_torchrun_generate_prints_what_one_process_prints(exports, name, tmp_path, capsys):
    """The issue's check: torchrun --nproc-per-node 2 esparse generate FT --tp 2 (gloo) against the same command
    in one process (shards merged), greedy; only rank 0 prints (each prompt once), only rank 0 logs."""
    argv = ["generate", str(exports[name]), "--tp", "2", "--dense", "--device", "cpu", "--prompt", "the quick brown",
            "--prompt", "sparse", "--max-new-tokens", "10"]
    assert main(argv) == 0
    one = capsys.readouterr().out
    with launched(tmp_path, (torchrun(ESPARSE, *argv, port=_free_port()), _env(0))) as (run,):
        assert run.wait(LAUNCH_TIMEOUT_S) == 0, run.stderr
    assert run.stdout == one and one.count("-" * 40) == 2
    assert "INFO rank 0" in run.stderr and "rank 1" not in run.stderr


def test_logits_and_serving_steps_match_one_process(exports, tmp_path):
    """Both ranks started directly: per folder, prefill and per-row decode logits, and the serving API's calls
    (rows prefilled alone, an idle pause only the keep-alive bridges, a batched decode), against the merged
    one-process model within 1e-4 (fp32); the vocabulary-split head on a vocabulary of 7 over 2 ranks."""
    sys.path.insert(0, str(HERE))
    import tp_worker

    out = tmp_path / "logits.pt"
    argv = [sys.executable, str(HERE / "tp_worker.py"), "check", str(out), *(str(exports[n]) for n in FOLDERS)]
    with launched(tmp_path, *ranks(argv, _free_port())) as procs:
        assert [p.wait(LAUNCH_TIMEOUT_S) for p in procs] == [0, 0], [p.stderr for p in procs]
    got = torch.load(out)
    heads = got.pop("heads")
    assert heads["head"].shape == (2, 3, 7) and torch.allclose(heads["head"], heads["head_ref"], atol=1e-5)
    for name in FOLDERS:
        model = load_decoder(exports[name], device="cpu", dtype=torch.float32, tp=2)
        with torch.no_grad():
            ref = {**tp_worker.model_logits(model), **tp_worker.serve_logits(model)}
        assert got[str(exports[name])].keys() == ref.keys()
        for key, r in ref.items():
            g = got[str(exports[name])][key]
            assert g.shape == r.shape and (g - r).abs().max().item() <= 1e-4, (name, key)
            assert torch.equal(g.argmax(-1), r.argmax(-1)), (name, key)


def test_bench_over_two_ranks(exports, tmp_path):
    """esparse bench --tp 2 on both ranks (as torchrun starts them): rank 0 alone prints and writes bench.json."""
    argv = [ESPARSE, "bench", str(exports["opt-pruned"]), "--tp", "2", "--backends", "torch", "--batches", "1,2",
            "--prompt-len", "8", "--decode-steps", "2", "--out", str(tmp_path / "b")]
    with launched(tmp_path, *ranks(argv, _free_port())) as (r0, r1):
        assert [r0.wait(LAUNCH_TIMEOUT_S), r1.wait(LAUNCH_TIMEOUT_S)] == [0, 0], (r0.stderr, r1.stderr)
    assert "over 2 ranks" in r0.stdout and "decode tok/s b=2" in r0.stdout and r1.stdout == ""
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert data["meta"]["tp"] == 2 and data["results"]["torch"]["decode_tok_s"]["2"] > 0


def test_bad_shard_on_one_rank_is_one_line_from_rank_0(exports, tmp_path):
    folder = tmp_path / "ft"
    shutil.copytree(exports["opt-dense"], folder)
    victim = folder / "2-gpu" / "model.layers.0.mlp.dense_h_to_4h.weight.1.bin"
    victim.write_bytes(victim.read_bytes()[:-4])
    argv = [ESPARSE, "generate", str(folder), "--tp", "2", "--device", "cpu", "--prompt", "x"]
    with launched(tmp_path, *ranks(argv, _free_port())) as (r0, r1):
        assert [r0.wait(LAUNCH_TIMEOUT_S), r1.wait(LAUNCH_TIMEOUT_S)] == [2, 2]
    err = [line for line in r0.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("esparse: error: rank 1: ") and "truncated" in err[0], r0.stderr
    assert "esparse: error" not in r1.stderr and r0.stdout == r1.stdout == ""


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_lost_rank_ends_the_others_with_one_error_within_the_timeout(exports, tmp_path, how):
    """Rank 1 killed (its socket closes: rank 0 fails at once) or stopped (it never answers: rank 0 gives up
    after --tp-timeout, 3 s here) while rank 0 drives serving steps: rank 0 exits 2 with one error line."""
    piddir = tmp_path / "pids"
    piddir.mkdir()
    argv = [sys.executable, str(HERE / "tp_worker.py"), "loop", str(exports["llama-pruned"]), str(piddir)]
    with launched(tmp_path, *ranks(argv, _free_port(), TP_TIMEOUT="3")) as (r0, r1):
        _wait_for([piddir / "0.pid", piddir / "1.pid"], [r0, r1], LAUNCH_TIMEOUT_S)
        t0 = time.monotonic()
        os.kill(int((piddir / "1.pid").read_text()), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        assert r0.wait(30) == 2
        took = time.monotonic() - t0
    err = [line for line in r0.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("esparse: error: rank 0: the ") and "another rank failed" in err[0], err
    assert ("Timed out" in err[0] and 2.5 < took < 20) if how == "stop" else took < 10, (err, took)


def test_torchrun_with_rank_0_killed_stops_rank_1_with_a_clear_error(exports, tmp_path):
    """Under torchrun, rank 0 (the driver) killed while rank 1 follows: rank 1 reports the lost collective,
    torchrun names the killed rank, and the run ends non-zero well within the 60 s timeout."""
    piddir = tmp_path / "pids"
    piddir.mkdir()
    argv = torchrun(str(HERE / "tp_worker.py"), "loop", str(exports["opt-pruned"]), str(piddir), port=_free_port())
    with launched(tmp_path, (argv, _env(0, TP_TIMEOUT="60"))) as (run,):
        _wait_for([piddir / "0.pid", piddir / "1.pid"], [run], LAUNCH_TIMEOUT_S)
        t0 = time.monotonic()
        os.kill(int((piddir / "0.pid").read_text()), signal.SIGKILL)
        assert run.wait(40) != 0
        assert time.monotonic() - t0 < 40
    assert "rank      : 0" in run.stderr and "SIGKILL" in run.stderr, run.stderr
    ours = [line for line in run.stderr.splitlines() if line.startswith("esparse: error:")]
    # rank 1 says so itself unless torchrun's SIGTERM came first (it polls the workers)
    assert len(ours) <= 1 and all(line.startswith("esparse: error: rank 1: the ") and "another rank failed" in line
                                  for line in ours), ours
