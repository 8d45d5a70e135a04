"""CPU checks of the decode path's pieces that need no GPU: the kernel's view of the exported 2:4 layout, the
decode attention's reference, and rows of one cache decoding at different positions.

The Triton kernels themselves run on the GPU (tests/test_gpu_decode.py); what they read is checked here."""

import math

import torch

from esparse.format.nm_pack import pack_nm
from esparse.ft_plugin import nm24
from esparse.python_api import attention
from esparse.python_api.loader import build_decoder
from esparse.python_api.random_weights import RandomWeights, random_24


def test_kernel_view_of_the_layout_is_the_weight():
    """values + meta read as int32 words (the kernel's view) expand to exactly the packed weight, with ties,
    -0.0 and all-zero groups, for K a multiple of 32 that is not one of 128."""
    g = torch.Generator().manual_seed(0)
    for n, k in [(48, 96), (16, 576), (8, 1536)]:
        w = random_24(n, k, "cpu", torch.float32, seed=n)
        w[0, :8] = torch.tensor([0.5, -0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0])
        w[1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 0.25])
        w = w.to(torch.float16)
        values, meta32 = nm24.pack_for_kernel(*(lambda p: (p.values, p.meta))(pack_nm(w, 2, 4)))
        assert meta32.dtype == torch.int32 and meta32.shape == (n, k // 32)
        assert torch.equal(nm24.expand_reference(values, meta32), w)
        x = torch.randn(3, k, generator=g).to(torch.float16)
        bias = torch.randn(n, generator=g).to(torch.float16)
        ref = (x.double() @ w.double().t() + bias.double()).clamp_min(0)
        got = nm24.reference_linear(x, values, meta32, bias, relu=True)
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_kernel_refuses_k_not_a_multiple_of_32():
    import pytest

    from esparse.errors import EsparseError

    p = pack_nm(random_24(16, 48, "cpu", torch.float16), 2, 4)
    with pytest.raises(EsparseError, match="multiple of 32"):
        nm24.pack_for_kernel(p.values, p.meta)


def test_attention_reference_is_softmax_over_each_rows_filled_slots():
    g = torch.Generator().manual_seed(1)
    b, h, hkv, s, d = 3, 6, 2, 20, 8
    q, k, v = torch.randn(b, h, d, generator=g), torch.randn(b, s, hkv, d, generator=g), torch.randn(b, s, hkv, d,
                                                                                                     generator=g)
    lengths = torch.tensor([1, 7, 20])
    got = attention.reference(q, k, v, lengths)
    for i in range(b):
        for j in range(h):
            kk, vv = k[i, : lengths[i], j // (h // hkv)], v[i, : lengths[i], j // (h // hkv)]
            p = torch.softmax(kk @ q[i, j] / math.sqrt(d), 0)
            assert torch.allclose(got[i, j], p @ vv, atol=1e-5)
    assert attention.splits_for(1, 32, 161) == 2 and attention.splits_for(64, 32, 4096) == 1


def test_rows_at_different_positions_decode_as_alone():
    """One batch whose rows hold prompts of different lengths decodes each row as it would alone."""
    model = build_decoder(RandomWeights("smollm2-135m", "cpu", torch.float32, layers=2), "cpu", torch.float32, "torch")
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    cache = model.new_cache(3, 16)
    for i, p in enumerate(prompts):
        model(torch.tensor([p]), cache.rows(i, i + 1), 0)
    tok = torch.tensor([[3], [4], [5]])
    batched = model(tok, cache, torch.tensor([len(p) for p in prompts]))
    for i, p in enumerate(prompts):
        alone = model(torch.tensor([p + [3 + i]]), model.new_cache(1, 16), 0)
        assert torch.allclose(batched[i], alone[0], atol=1e-4), i


def test_packing_stays_on_the_weights_device():
    """The 2:4 metadata is packed where the weight is (a CUDA weight once met a CPU arange here); the meta device
    stands in for a GPU on a CPU-only machine: any stray CPU tensor in the arithmetic raises."""
    from esparse.format.nm_pack import pack_indices, row_meta_bytes

    idx = torch.randint(0, 4, (3, 16)).to("meta")
    out = pack_indices(idx, 32, 2, 4)
    assert out.device.type == "meta" and out.shape == (3, row_meta_bytes(32, 2, 4))
