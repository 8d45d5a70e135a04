"""bench/serve.py end to end on the CPU (the GPU run uses the same code with --shape llama-7b): it starts
``esparse serve --shape`` (random weights, no tokenizer: token-id prompts), drives it with the openai client at
one Poisson rate and one closed-loop concurrency, stops it, and writes the per-mode and combined reports."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_serve_bench_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "serve"
    cmd = [sys.executable, str(ROOT / "bench" / "serve.py"), "--shape", "smollm2-135m", "--layers", "1",
           "--device", "cpu", "--modes", "dense", "--rates", "50", "--concurrencies", "2", "--num-prompts", "4",
           "--warmup", "1", "--input-len", "8", "--output-len", "5", "--max-batch", "4", "--max-len", "32",
           "--start-timeout", "300", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "serve.json").read_text())
    run = report["runs"]["dense"]
    assert run["server_idle"] == {"esparse_kv_slots_used": 0.0, "esparse_running_requests": 0.0,
                                  "esparse_waiting_requests": 0.0}
    assert [(p["rate"], p["concurrency"]) for p in run["points"]] == [(50.0, 4), ("inf", 2)]
    for p in run["points"]:
        assert (p["completed"], p["failed"], p["output_tokens"]) == (4, 0, 20)
        for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "itl_p50_ms", "itl_p99_ms", "output_tok_per_s",
                    "requests_per_s", "decode_step_mean_ms", "mean_running_batch"):
            assert math.isfinite(p[key]) and p[key] > 0, key
        assert p["ttft_p50_ms"] <= p["ttft_p99_ms"] and p["itl_p50_ms"] <= p["itl_p99_ms"]
    assert (out / "serve.png").stat().st_size > 0 and (out / "server_dense.log").is_file()
    assert report["sparse_over_dense"] == []  # one mode: no ratios
