import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import save_model, write_text  # noqa: E402


def pytest_collection_modifyitems(config, items):
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
