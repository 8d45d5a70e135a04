"""The runtime's torch path against HF transformers on tiny random LLaMA (GQA) and OPT models."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from esparse.cli import main
from esparse.errors import EsparseError
from esparse.python_api import build_decoder, load_decoder
from esparse.python_api.generate import generate, sample

from helpers import save_model


@pytest.fixture(scope="module", params=["llama", "opt"])
def exported(request, tmp_path_factory, calib_file):
    """(hf folder, exported folder) for a dense and a shuffled E-Sparse pruned model."""
    root = tmp_path_factory.mktemp(f"rt-{request.param}")
    src = save_model(request.param, root / "src")
    pruned = root / "pruned"
    assert main(["prune", str(src), "--calib", str(calib_file), "--out", str(pruned), "--nsamples", "2",
                 "--seqlen", "16", "--device", "cpu"]) == 0
    out = {}
    for name, folder in (("dense", src), ("pruned", pruned)):
        assert main(["export", str(folder), "--out", str(root / f"ft-{name}"), "--dtype", "fp32"]) == 0
        out[name] = (folder, root / f"ft-{name}")
    return out


def _hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_logits_match_transformers(exported, which):
    hf_dir, ft_dir = exported[which]
    hf = _hf(hf_dir)
    rt = load_decoder(ft_dir, device="cpu", dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    cache = rt.new_cache(2, 32)
    got = rt(ids, cache, 0, all_logits=True)
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-3
    # decode one token at a time through the cache gives the same last logits
    cache = rt.new_cache(2, 32)
    rt(ids[:, :10], cache, 0)
    for j in range(10, 20):
        step = rt(ids[:, j : j + 1], cache, torch.tensor([j, j]))
    assert ((step[:, -1] - ref[:, -1]).norm() / ref[:, -1].norm()).item() <= 1e-3


def test_greedy_generation_matches_transformers(exported):
    hf_dir, ft_dir = exported["pruned"]
    hf = _hf(hf_dir)
    rt = load_decoder(ft_dir, device="cpu", dtype=torch.float32)
    prompt = [5, 17, 42, 99, 7, 3]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(rt, [prompt], 12) == [ref]


def test_batched_prompts_of_different_lengths_match_single(exported):
    _, ft_dir = exported["pruned"]
    rt = load_decoder(ft_dir, device="cpu", dtype=torch.float32)
    prompts = [[5, 17, 42, 99, 7, 3, 8, 9], [11, 12, 13], [21, 22, 23, 24, 25]]
    batched = generate(rt, prompts, 8)
    assert batched == [generate(rt, [p], 8)[0] for p in prompts]


def test_sampling_is_seeded_and_top_p_limits_choice():
    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample(logits, temperature=1.0, top_p=0.5, generator=g)
    assert set(draws.tolist()) == {0}
    draws = sample(logits, temperature=1.0, top_p=0.99, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    assert torch.equal(sample(logits, 0.0), torch.zeros(200, dtype=torch.long))


def test_sparse_path_refused_on_cpu(exported):
    _, ft_dir = exported["pruned"]
    with pytest.raises(EsparseError, match="CUDA"):
        load_decoder(ft_dir, device="cpu", dtype=torch.float32, sparse=True)


def test_generate_cli_on_export_and_refusal_of_an_hf_folder(exported, capsys):
    hf_dir, ft_dir = exported["pruned"]
    assert main(["generate", str(ft_dir), "--prompt", "the quick brown", "--prompt", "sparse",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("-" * 40) == 2 and "the quick brown" in out
    assert main(["generate", str(hf_dir), "--prompt", "x", "--device", "cpu"]) == 2  # export is explicit
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"esparse export {hf_dir} --out FT_DIR" in err[0]


def test_generate_on_the_tp_folder_itself_and_with_tp(exported, capsys):
    _, ft_dir = exported["pruned"]
    for argv in ([str(ft_dir / "1-gpu")], [str(ft_dir), "--tp", "1"]):  # tokenizer found beside <tp>-gpu
        assert main(["generate", *argv, "--prompt", "sparse", "--max-new-tokens", "3", "--device", "cpu"]) == 0
        assert capsys.readouterr().out.startswith("sparse")
    assert main(["generate", str(ft_dir), "--tp", "2", "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no 2-gpu folder" in err[0]


def test_bench_cli_smoke_on_cpu(exported, tmp_path, capsys):
    import json

    _, ft_dir = exported["pruned"]
    assert main(["bench", str(ft_dir), "--backends", "torch", "--batches", "1,2", "--prompt-len", "16",
                 "--decode-steps", "3", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "decode tok/s b=2" in out and "prefill ms" in out
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert data["results"]["torch"]["decode_tok_s"]["1"] > 0
    assert (tmp_path / "b" / "bench.png").is_file()
    assert main(["bench", str(ft_dir), "--backends", "dense,sparse", "--out", str(tmp_path / "c")]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_random_shape_weights_are_24_and_complete(monkeypatch):
    from esparse.converter.masks import is_nm_sparse
    from esparse.format import shapes
    from esparse.python_api.bench import measure
    from esparse.python_api.random_weights import RandomWeights

    monkeypatch.setitem(shapes.SHAPES, "tiny", dict(arch="llama", hidden=64, n_heads=4, n_kv=2, head_dim=16,
                                                   inter=128, n_layers=2, vocab=100, max_pos=64, eps=1e-6))
    src = RandomWeights("tiny", "cpu", torch.float32)
    lw0, lw1 = src.layer(0), src.layer(1)
    assert len(lw1.linears) == 5 and all(is_nm_sparse(t, 2, 4) for t in lw1.linears.values())
    name0, name1 = next(iter(lw0.linears)), next(iter(lw1.linears))
    assert not torch.equal(lw0.linears[name0], lw1.linears[name1])  # every layer its own weights
    model = build_decoder(src, "cpu", torch.float32, "torch")
    res = measure(model, 8, [1, 2], 2, graphs=False)
    assert res["prefill_s"] > 0 and set(res["decode_tok_s"]) == {1, 2} and res["first_prefill_s"] > 0


def test_benchmark_gemm_shapes_come_from_the_family_description():
    from esparse.format.shapes import gemm_shapes

    # the runtime's GEMMs: fused qkv, o, gate+up fused (gated MLP) or fc1, down or fc2
    assert gemm_shapes("llama-7b") == [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096),
                                       ("down", 4096, 11008)]
    assert gemm_shapes("opt-6.7b") == [("qkv", 12288, 4096), ("o", 4096, 4096), ("fc1", 16384, 4096),
                                       ("fc2", 4096, 16384)]
    assert gemm_shapes("smollm2-135m")[0] == ("qkv", 9 * 64 + 2 * 3 * 64, 576)  # grouped-query attention


def test_the_loader_reads_one_layer_at_a_time_and_keeps_none(exported):
    """build_decoder asks for layers in order and drops each one's stored tensors before the next: what it
    holds is the model being filled, never a second copy of the folder."""
    import weakref

    from esparse.format.ft_loader import FTFolder

    folder = FTFolder(exported["pruned"][1])
    asked, alive = [], []

    class Watched:
        cfg = folder.cfg

        def model_tensors(self):
            return folder.model_tensors()

        def layer(self, i):
            assert all(r() is None for r in alive), "the previous layer's stored tensors are still held"
            asked.append(i)
            lw = folder.layer(i)
            alive.append(weakref.ref(lw))
            return lw

    model = build_decoder(Watched(), "cpu", torch.float32, "torch")
    assert asked == list(range(folder.cfg.n_layers))
    ref = load_decoder(exported["pruned"][1], device="cpu", dtype=torch.float32)
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model(ids, model.new_cache(1, 16), 0), ref(ids, ref.new_cache(1, 16), 0))


def test_modules_carry_the_paper_names(exported):
    rt = load_decoder(exported["pruned"][1], device="cpu", dtype=torch.float32)
    names = {n for n, _ in rt.named_modules()}
    assert {"tok_embeddings", "layers.0.attention_norm", "layers.0.attention.wqkv", "layers.0.attention.wo",
            "layers.0.ffn_norm", "layers.0.feed_forward.w1", "layers.0.feed_forward.w2", "norm", "output"} <= names
    assert not any(p.device.type == "meta" for p in [*rt.parameters(), *rt.buffers()])
