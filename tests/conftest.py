import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import save_model, write_text  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # the Qwen2.5-Coder-0.5B tests are opt-in (a 480 MB download and minutes of CPU): only a -m naming qwen runs
    # them, so the default selection and CI keep their time and need no more network than before
    if "qwen" not in (config.getoption("markexpr", "") or ""):
        skip_qwen = pytest.mark.skip(reason="opt-in: run with pytest -m qwen")
        for item in items:
            if "qwen" in item.keywords:
                item.add_marker(skip_qwen)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("text") / "calib.txt")


@pytest.fixture(scope="session", params=["llama", "opt"])
def model_dir(request, tmp_path_factory) -> Path:
    return save_model(request.param, tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_model("llama", tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module", params=["llama", "opt"])
def pruned_export(tmp_path_factory, request) -> Path:
    """A pruned (2:4 on the GPU), exported tiny model of each family, for the GPU tests. OPT has biases on
    every linear and a ReLU after w1, so bias and activation paths are exercised through the runtime."""
    from esparse.cli import main

    root = tmp_path_factory.mktemp(f"gpu-rt-{request.param}")
    calib = write_text(root / "calib.txt")
    kw = dict(num_key_value_heads=2) if request.param == "llama" else dict(word_embed_proj_dim=256)
    src = save_model(request.param, root / "src", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     **kw)
    assert main(["prune", str(src), "--calib", str(calib), "--out", str(root / "p"), "--nsamples", "4",
                 "--seqlen", "32", "--device", "cuda"]) == 0
    assert main(["export", str(root / "p"), "--out", str(root / "ft")]) == 0
    return root / "ft"
