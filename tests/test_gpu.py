"""GPU tests (run on the device machine): the plugin's GEMMs and the runtime's sparse path.

    python -m pytest -q -m gpu tests/test_gpu.py
"""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

MS = [1, 3, 8, 17, 64, 333, 2048]


def _ops():
    from esparse.ft_plugin import build_info

    info = build_info()
    if not info.built:
        pytest.fail(f"ft_plugin not built on a GPU machine: {info.reason}")
    from esparse.ft_plugin import ops

    return ops


def _weight_24(n, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
    keep = w.view(n, -1, 4).abs().topk(2, -1).indices
    mask = torch.zeros_like(w.view(n, -1, 4), dtype=torch.bool).scatter_(-1, keep, True).view(n, k)
    return (w * mask).to(dtype)


def _poison(shape, dtype):
    """Leave NaNs in the caching allocator's next block of this size, so stale output would show."""
    t = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
    del t


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ["none", "relu"])
def test_sparse_and_dense_linear_match_fp32(dtype, bias, act):
    ops = _ops()
    n, k = 256, 512
    w = _weight_24(n, k, dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    sw = ops.SparseWeight(w)
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.float() @ w.float().t() + (b.float() if bias else 0)
        ref = torch.relu(ref) if act == "relu" else ref
        _poison((m, n), dtype)
        assert _rel(ops.sparse_linear(x, sw, b, act), ref) <= 1e-2, (m, "sparse")
        _poison((m, n), dtype)
        assert _rel(ops.dense_linear(x, w, b, act), ref) <= 1e-2, (m, "dense")
    x3 = torch.randn(2, 5, k, device="cuda", dtype=dtype)  # leading batch dims
    assert ops.sparse_linear(x3, sw, b, act).shape == (2, 5, n)


def test_non_24_weight_is_refused():
    ops = _ops()
    with pytest.raises(RuntimeError, match="not 2:4"):
        ops.SparseWeight(torch.randn(128, 256, device="cuda", dtype=torch.float16))


def test_cuda_graph_replay_matches_eager():
    ops = _ops()
    w = _weight_24(384, 256, torch.float16)
    sw = ops.SparseWeight(w)
    x = torch.randn(8, 256, device="cuda", dtype=torch.float16)
    eager = ops.sparse_linear(x, sw)
    dense_eager = ops.dense_linear(x, w)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ys = ops.sparse_linear(x, sw)
        yd = ops.dense_linear(x, w)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.testing.assert_close(ys, ops.sparse_linear(x, sw))
    torch.testing.assert_close(yd, ops.dense_linear(x, w))
    assert not torch.equal(ys, eager) and not torch.equal(yd, dense_eager)


def test_algorithm_cache_is_written_once_and_reused(tmp_path):
    script = (
        "import torch; from esparse.ft_plugin import ops\n"
        "g = torch.Generator(device='cuda').manual_seed(0)\n"
        "w = torch.randn(256, 512, device='cuda', generator=g)\n"
        "k = w.view(256, -1, 4).abs().topk(2, -1).indices\n"
        "m = torch.zeros_like(w.view(256, -1, 4), dtype=torch.bool).scatter_(-1, k, True).view(256, 512)\n"
        "sw = ops.SparseWeight((w * m).half())\n"
        "for n in (1, 8, 64): ops.sparse_linear(torch.randn(n, 512, device='cuda').half(), sw)\n"
        "print(ops.SEARCHES)\n"
    )
    env = dict(os.environ, ESPARSE_GEMM_CACHE=str(tmp_path / "algos.txt"))
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.strip() == "2"  # buckets 16 and 64
    text = (tmp_path / "algos.txt").read_text()
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert second.stdout.strip() == "0"
    assert (tmp_path / "algos.txt").read_text() == text


@pytest.fixture(scope="module")
def pruned_export(tmp_path_factory):
    from esparse.cli import main

    from helpers import save_model, write_text

    root = tmp_path_factory.mktemp("gpu-rt")
    calib = write_text(root / "calib.txt")
    src = save_model("llama", root / "src", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2)
    assert main(["prune", str(src), "--calib", str(calib), "--out", str(root / "p"), "--nsamples", "4",
                 "--seqlen", "32", "--device", "cuda"]) == 0
    assert main(["export", str(root / "p"), "--out", str(root / "ft")]) == 0
    return root / "ft"


def test_runtime_sparse_matches_dense_and_graph_matches_eager(pruned_export):
    _ops()
    from esparse.python_api import load_decoder
    from esparse.python_api.generate import generate

    dense = load_decoder(pruned_export, device="cuda", dtype=torch.float16, sparse=False)
    sparse = load_decoder(pruned_export, device="cuda", dtype=torch.float16, sparse=True)
    ids = torch.randint(3, 300, (2, 40), device="cuda")
    a = dense(ids, dense.new_cache(2, 64), 0, all_logits=True)
    b = sparse(ids, sparse.new_cache(2, 64), 0, all_logits=True)
    assert _rel(b, a) <= 2e-2
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    assert generate(sparse, prompts, 16, cuda_graph=True) == generate(sparse, prompts, 16, cuda_graph=False)
