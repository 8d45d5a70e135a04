"""GPU tests of the decode path (run on the device machine): our 2:4 kernel, decode attention, the compiled
step, the plugin ops under torch.compile.

Bounds: GEMMs against an fp64 reference on fresh random inputs, relative Frobenius error <= 1e-2 (fp16/bf16
inputs, fp32 accumulation); attention against fp32 SDPA, max abs error <= 2e-2 on unit-variance inputs; the
compiled step's logits within 2e-2 (relative) of the same model in fp32 and its greedy tokens equal to the
eager step's.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

MS = [1, 2, 3, 7, 8, 15, 16, 17, 33, 64, 65, 200]
SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (80, 96)]  # N, K multiples of 16 (not 128) included


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _w24(n, k, dtype, seed):
    from esparse.python_api.random_weights import random_24

    w = random_24(n, k, "cuda", torch.float32, seed).to(dtype)
    w[0, :8] = torch.tensor([0.5, -0.0, 0.0, 0.5, -0.25, 0.25, 0.0, 0.0])  # a tie, -0.0, a lone pair
    w[1, :4] = 0  # a group of zeros
    return w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_nm24_linear_matches_fp64(n, k, dtype):
    from esparse.python_api.linear import NM24Linear

    w = _w24(n, k, dtype, seed=n + k)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    for relu in (False, True):
        lin = NM24Linear(w, bias, relu)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ w.double().t() + bias.double()
            if relu:
                ref = ref.clamp_min(0)
            got = lin(x)
            assert got.dtype == dtype and got.shape == (m, n)
            assert _rel(got, ref) <= 1e-2, (n, k, m, relu)
    lin = NM24Linear(w)  # no bias, 3-D input
    x = torch.randn(2, 3, k, device="cuda", dtype=dtype)
    assert _rel(lin(x), x.double() @ w.double().t()) <= 1e-2


def test_nm24_under_cuda_graph_and_compile():
    from esparse.python_api.linear import NM24Linear
    from esparse.python_api.timing import capture_graph

    w = _w24(1536, 576, torch.float16, 0)
    lin = NM24Linear(w)
    x = torch.randn(4, 576, device="cuda", dtype=torch.float16)
    graph, out = capture_graph(lambda: lin(x), x.device)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert _rel(out, x.double() @ w.double().t()) <= 1e-2
    compiled = torch.compile(lambda t: torch.relu(lin(t)) * 2, fullgraph=True)
    assert _rel(compiled(x), (x.double() @ w.double().t()).clamp_min(0) * 2) <= 1e-2


def test_nm24_refuses_a_dense_weight():
    from esparse.errors import EsparseError
    from esparse.python_api.linear import NM24Linear

    with pytest.raises(EsparseError, match="not 2:4"):
        NM24Linear(torch.randn(64, 64, device="cuda", dtype=torch.float16))


@pytest.mark.parametrize("b,h,hkv,s,d", [(1, 32, 32, 300, 128), (5, 9, 3, 1000, 64), (3, 8, 1, 64, 128)])
def test_decode_attention_matches_sdpa(b, h, hkv, s, d):
    from esparse.python_api.attention import decode_attention, reference

    q = torch.randn(b, h, d, device="cuda", dtype=torch.float16)
    k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.float16)
    v = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.float16)
    lengths = torch.randint(1, s + 1, (b,), device="cuda")
    lengths[0] = 1
    got = decode_attention(q, k, v, lengths)
    ref = reference(q.float(), k.float(), v.float(), lengths)
    assert (got.float() - ref).abs().max().item() <= 2e-2


@pytest.mark.parametrize("backend", ["sparse", "torch"])
def test_compiled_graphed_step_matches_eager_and_fp32(pruned_export, backend):
    from esparse.python_api import load_decoder
    from esparse.python_api.generate import generate

    ref = load_decoder(pruned_export, device="cuda", dtype=torch.float32, backend="torch")
    model = load_decoder(pruned_export, device="cuda", dtype=torch.float16, backend=backend)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    eager = generate(model, prompts, 32)
    model.compile_decode()
    assert generate(model, prompts, 32, cuda_graph=True) == eager
    # the compiled step's logits against fp32, rows at different positions
    cache, cache32 = model.new_cache(3, 64), ref.new_cache(3, 64)
    for i, p in enumerate(prompts):
        model(torch.tensor([p], device="cuda"), cache.rows(i, i + 1), 0)
        ref(torch.tensor([p], device="cuda"), cache32.rows(i, i + 1), 0)
    start = torch.tensor([len(p) for p in prompts], device="cuda")
    tok = torch.tensor([[3], [4], [5]], device="cuda")
    assert _rel(model(tok, cache, start), ref(tok, cache32, start)) <= 2e-2


def test_plugin_ops_trace_under_compile():
    from esparse.ft_plugin import build_info

    if not build_info().built:
        pytest.fail(f"ft_plugin not built on a GPU machine: {build_info().reason}")
    from esparse.ft_plugin import ops

    w = _w24(512, 256, torch.float16, 3)
    sw = ops.SparseWeight(w)
    x = torch.randn(8, 256, device="cuda", dtype=torch.float16)
    f = torch.compile(lambda t: ops.dense_linear(t, w) + ops.sparse_linear(t, sw), fullgraph=True)
    assert _rel(f(x), 2 * (x.double() @ w.double().t())) <= 1e-2
