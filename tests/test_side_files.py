"""Issue 24, class 4: config.ini, the permutation files and the tokenizer files of an export are covered by its
checksums and validated on load. An edited config.ini (dtype relabelled, head counts, rope_theta, eps) is refused by
its checksum; with the checksums recomputed, a value the runtime cannot take, or a permutation that repeats or
leaves its range, is still refused by name; nothing is served and no traceback is printed."""

import shutil

import numpy as np
import pytest

from esparse.cli import main
from esparse.format.ft_format import read_manifest, write_checksums

from helpers import save_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, calib_file):
    root = tmp_path_factory.mktemp("side")
    src = save_model("llama", root / "src")
    assert main(["prune", str(src), "--calib", str(calib_file), "--out", str(root / "p"), "--nsamples", "2",
                 "--seqlen", "16", "--device", "cpu"]) == 0
    assert main(["export", str(root / "p"), "--out", str(root / "ft"), "--dtype", "fp32"]) == 0
    return root / "ft"


@pytest.fixture
def ft(exported, tmp_path):
    dst = tmp_path / "ft"
    shutil.copytree(exported, dst)
    return dst


def _generate(ft, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["generate", str(ft), "--prompt", "the quick", "--max-new-tokens", "2", "--device", "cpu"])
    cap = capsys.readouterr()
    lines = [line for line in cap.err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in cap.err
    if rc:
        assert len(lines) == 1 and lines[0].startswith("esparse: error:"), cap.err[-2000:]
        assert not cap.out  # nothing generated
    return rc, lines[0] if lines else ""


def _resum(folder) -> None:
    write_checksums(folder, list(read_manifest(folder)))


EDITS = {
    "dtype relabelled": ("weight_data_type = fp32", "weight_data_type = fp16"),
    "head counts": ("head_num = 4\nsize_per_head = 16", "head_num = 8\nsize_per_head = 8"),
    "rope_theta": ("rope_theta = 10000.0", "rope_theta = 500000.0"),
    "eps nan": ("layernorm_eps = 1e-06", "layernorm_eps = nan"),
    "activation": ("activation = silu", "activation = gelu"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_config_ini_is_refused_by_its_checksum(ft, edit, capsys):
    assert _generate(ft, capsys)[0] == 0
    ini = ft / "1-gpu" / "config.ini"
    old, new = EDITS[edit]
    assert old in ini.read_text()
    ini.write_text(ini.read_text().replace(old, new))
    rc, line = _generate(ft, capsys)
    assert rc == 2 and "config.ini does not match its sha256" in line


@pytest.mark.parametrize("key,value,named", [
    ("layernorm_eps", "nan", "layernorm_eps = nan is not a number in (0, 1)"),
    ("weight_data_type", "int3", "weight_data_type = 'int3' is not one of fp16, bf16, fp32"),
    ("sparsity", "two:four", "sparsity 'two:four' is not N:M"),
    ("sparsity", "2:0", "sparsity '2:0' needs 0 < N < M"),
    ("activation", "gelu_fast", "activation = 'gelu_fast' is not one of"),
    ("kv_head_num", "3", "kv_head_num = 3 does not divide head_num = 4"),
    ("rope_theta", "-1", "rope_theta = -1.0 is not a positive finite number"),
    ("num_layer", "0", "n_layers = 0 is not a positive integer"),
    ("biases", "attn_in,everything", "biases = 'attn_in,everything' names a group outside"),
])
def test_a_value_the_runtime_cannot_take_is_refused_even_with_checksums_redone(ft, key, value, named, capsys):
    ini = ft / "1-gpu" / "config.ini"
    lines = [f"{key} = {value}" if line.split(" = ")[0] == key else line for line in ini.read_text().splitlines()]
    ini.write_text("\n".join(lines) + "\n")
    _resum(ft / "1-gpu")
    rc, line = _generate(ft, capsys)
    assert rc == 2 and named in line


@pytest.mark.parametrize("damage,named", [("repeat", "repeated entries"), ("minus_one", "out-of-range entries"),
                                          ("too_large", "out-of-range entries")])
@pytest.mark.parametrize("stem", ["input_layernorm", "attention.dense"])
def test_a_permutation_that_is_not_one_is_refused_even_with_checksums_redone(ft, stem, damage, named, capsys):
    f = ft / "1-gpu" / f"model.layers.1.{stem}.perm.bin"
    p = np.fromfile(f, dtype=np.int32)
    if damage == "repeat":
        p[1] = p[0]
    elif damage == "minus_one":
        p[0] = -1
    else:
        p[0] = 10**6
    p.tofile(f)
    rc, line = _generate(ft, capsys)
    assert rc == 2 and "does not match its sha256" in line
    _resum(ft / "1-gpu")
    rc, line = _generate(ft, capsys)
    assert rc == 2 and f"{f.name} is not a permutation of 64 channels ({named})" in line


def test_a_changed_tokenizer_file_is_refused(ft, capsys):
    import json

    tok = ft / "tokenizer.json"
    data = json.loads(tok.read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids: the same ids would decode to other text
    tok.write_text(json.dumps(data))
    rc, line = _generate(ft, capsys)
    assert rc == 2 and "tokenizer.json does not match its sha256 in tokenizer.sha256" in line
    (ft / "tokenizer.sha256").unlink()
    rc, line = _generate(ft, capsys)
    assert rc == 2 and "tokenizer.sha256 is missing" in line


def test_a_format_1_folder_still_loads_with_a_warning(ft, capsys, caplog):
    """An export made before format 2: no activation/biases keys, config.ini not in the checksums."""
    folder = ft / "1-gpu"
    ini = folder / "config.ini"
    text = ini.read_text().replace("format_version = 2", "format_version = 1")
    ini.write_text("".join(line + "\n" for line in text.splitlines()
                           if not line.startswith(("activation =", "biases ="))))
    sums = read_manifest(folder)
    del sums["config.ini"]
    write_checksums(folder, list(sums))
    (ft / "tokenizer.sha256").unlink()
    (ft / ".esparse-output").unlink()
    with caplog.at_level("WARNING"):
        rc, _ = _generate(ft, capsys)
    assert rc == 0 and "format_version 1: config.ini is not covered by a checksum" in caplog.text


def test_a_tensor_parallel_rank_checks_its_permutations_too(tmp_path, calib_file):
    """The per-rank reader (esparse/format/ft_shard.py) refuses a repeated permutation entry as the one-device
    loader does; and an OPT rank's config (heads / tp) is a valid config."""
    from esparse.errors import EsparseError
    from esparse.format.ft_shard import FTShard, local_config

    src = save_model("llama", tmp_path / "src")
    assert main(["prune", str(src), "--calib", str(calib_file), "--out", str(tmp_path / "p"), "--nsamples", "2",
                 "--seqlen", "16", "--device", "cpu"]) == 0
    assert main(["export", str(tmp_path / "p"), "--out", str(tmp_path / "ft"), "--tp", "2", "--dtype", "fp32"]) == 0
    folder = tmp_path / "ft" / "2-gpu"
    FTShard(tmp_path / "ft", 2, 1).layer(1)  # intact: reads
    f = folder / "model.layers.1.post_attention_layernorm.perm.bin"
    p = np.fromfile(f, dtype=np.int32)
    p[3] = p[2]
    p.tofile(f)
    _resum(folder)
    with pytest.raises(EsparseError, match="is not a permutation of 64 channels"):
        FTShard(tmp_path / "ft", 2, 1).layer(1)
    from esparse.format.ft_format import FTConfig

    opt = FTConfig(arch="opt", hidden=64, n_heads=4, n_kv=4, head_dim=16, inter=128, n_layers=2, vocab=300,
                   max_pos=128, eps=1e-5, tp=2)
    assert local_config(opt).n_heads == 2
