"""FasterTransformer export: round trips, tp shards, the packed N:M layout, validation errors."""

import os

import pytest
import torch

from esparse.cli import main
from esparse.converter.arch import decoder_base, head_shape
from esparse.converter.masks import nm_mask
from esparse.converter.serving_order import serving_layer
from esparse.errors import EsparseError
from esparse.format.families import FAMILIES
from esparse.format.ft_format import linear_specs
from esparse.format.nm_pack import PackedNM, pack_nm, unpack_nm
from esparse.format.pruned import read_prune_meta

from helpers import load_ft


def _reference_pack(w, n, m):
    """Straightforward per-entry packing, as docs/format.md describes it."""
    bits = max(1, (m - 1).bit_length())
    rows, k = w.shape
    values, meta = [], []
    for r in range(rows):
        vals, bitstr = [], []
        for g in range(k // m):
            grp = w[r, g * m : (g + 1) * m].tolist()
            nz = [j for j in range(m) if grp[j] != 0]
            chosen = sorted((nz + [j for j in range(m) if j not in nz])[:n])
            for j in chosen:
                vals.append(grp[j])
                bitstr += [(j >> b) & 1 for b in range(bits)]
        bitstr += [0] * (-len(bitstr) % 8)
        meta.append([sum(bitstr[i + b] << b for b in range(8)) for i in range(0, len(bitstr), 8)])
        values.append(vals)
    return torch.tensor(values, dtype=w.dtype), torch.tensor(meta, dtype=torch.uint8)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_pack_matches_reference_bit_order(n, m):
    torch.manual_seed(n * m)
    w = torch.randn(5, 8 * m)
    w = w * nm_mask(w.abs(), n, m)
    w[0, :m] = 0  # a group with fewer than N non-zeros
    p = pack_nm(w, n, m)
    ref_v, ref_m = _reference_pack(w, n, m)
    assert torch.equal(p.values, ref_v) and torch.equal(p.meta, ref_m)
    assert torch.equal(unpack_nm(p), w)


def test_pack_known_bytes_2_4():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 4.0, 0.0, 0.0]])  # positions (1, 3), (0, 1)
    p = pack_nm(w, 2, 4)
    assert p.values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert p.meta.tolist() == [[0b01_00_11_01]]  # LSB first: 1, 3, 0, 1


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_packed_index_check_agrees_with_unpacking(n, m):
    """The byte-table check (used where groups tile whole bytes) refuses exactly what unpacking refuses, and
    names the same row and group."""
    from esparse.format.nm_pack import check_packed, check_positions, unpack_indices

    g = torch.Generator().manual_seed(n * 10 + m)
    rows, k = 12, 64
    w = torch.randn(rows, k, generator=g)
    meta = pack_nm(w * nm_mask(w.abs(), n, m), n, m).meta
    check_packed(meta, k, n, m)  # valid
    refused = 0
    for trial in range(40):
        bad = meta.clone()
        r, b = trial % rows, (7 * trial) % meta.shape[1]
        bad[r, b] = torch.randint(0, 256, (1,), generator=g).to(torch.uint8)
        pos = unpack_indices(bad, k, n, m).reshape(rows, k // m, n)
        try:
            check_positions(pos, m)
            want = None
        except EsparseError as e:
            want = str(e)
        try:
            check_packed(bad, k, n, m)
            got = None
        except EsparseError as e:
            got = str(e)
        assert got == want
        refused += want is not None
    assert refused > 0 or n == 1  # 1:4 has no invalid byte (every 2-bit position is in its group)


def test_pack_refuses_non_nm():
    with pytest.raises(EsparseError, match="not 2:4 sparse: row 0, group 0"):
        pack_nm(torch.ones(2, 8), 2, 4)


def _pruned(tmp_path, arch, calib_file, pattern="2:4", **kw):
    from helpers import save_model

    src = save_model(arch, tmp_path / f"{arch}-src", **kw)
    out = tmp_path / f"{arch}-pruned-{pattern.replace(':', '')}"
    assert main(["prune", str(src), "--calib", str(calib_file), "--out", str(out), "--nsamples", "2",
                 "--seqlen", "16", "--device", "cpu", "--pattern", pattern]) == 0
    return src, out


def _export(src, out, tp=1):
    assert main(["export", str(src), "--out", str(out), "--tp", str(tp), "--dtype", "fp32"]) == 0
    return load_ft(out)


def _serving_weights(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    meta = read_prune_meta(folder)
    perms = meta[1] if meta else {}
    arch = model.config.model_type
    out = []
    for i, layer in enumerate(decoder_base(model).layers):
        lp = {g: perms[f"layers.{i}.{g}"] for g in ("attn_in", "attn_out", "mlp_in", "mlp_out")
              if f"layers.{i}.{g}" in perms}
        out.append(serving_layer(FAMILIES[arch], dict(layer.state_dict()), lp, head_shape(model.config))[0])
    return model, out


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("pruned", [False, True])
def test_roundtrip_bit_identical_and_tp_shards(tmp_path, calib_file, arch, pruned):
    kw = dict(num_attention_heads=8, num_key_value_heads=4) if arch == "llama" else {}
    src, pruned_dir = _pruned(tmp_path, arch, calib_file, **kw)
    folder = pruned_dir if pruned else src
    ft1 = _export(folder, tmp_path / "ft1")
    model, serv = _serving_weights(folder)
    for i, layer_t in enumerate(serv):
        for spec in linear_specs(ft1.cfg, i):
            w = torch.cat([layer_t[f"{h}.weight"] for h in spec.hf], 0)
            assert isinstance(ft1.linears[spec.name], PackedNM) == pruned
            assert torch.equal(ft1.dense(spec.name), w), spec.name
    sd = model.state_dict()
    key = "model.embed_tokens.weight" if arch == "llama" else "model.decoder.embed_tokens.weight"
    wte = ft1.tensors["model.wte.weight" if arch == "llama" else "model.wte"]
    assert torch.equal(wte, sd[key])
    if arch == "opt":
        assert torch.equal(ft1.tensors["model.wpe"], sd["model.decoder.embed_positions.weight"][2:])
    for tp in (2, 4) if arch == "llama" else (2,):
        ftn = _export(folder, tmp_path / f"ft{tp}", tp)
        assert ftn.cfg.tp == tp
        for name in ft1.linears:
            a, b = ft1.linears[name], ftn.linears[name]
            if pruned:
                assert torch.equal(a.values, b.values) and torch.equal(a.meta, b.meta)
            else:
                assert torch.equal(a, b)
        for name in ft1.biases:
            assert torch.equal(ft1.biases[name], ftn.biases[name])
        assert ft1.perms.keys() == ftn.perms.keys()


def test_4_8_export_roundtrip(tmp_path, calib_file):
    _, pruned = _pruned(tmp_path, "llama", calib_file, "4:8")
    ft = _export(pruned, tmp_path / "ft")
    assert ft.cfg.nm == (4, 8)
    w = next(iter(ft.linears.values()))
    assert w.meta.shape[1] == w.k // 8 * 4 * 3 // 8


def test_size_ratio_and_cli_summary(tmp_path, calib_file, capsys):
    src, pruned = _pruned(tmp_path, "llama", calib_file)
    assert main(["export", str(pruned), "--out", str(tmp_path / "sp")]) == 0
    assert "0.5625x" in capsys.readouterr().out
    lin = lambda d: sum(p.stat().st_size for p in (d / "1-gpu").glob("*layers*.bin") if "perm" not in p.name
                        and "layernorm" not in p.name)
    assert main(["export", str(src), "--out", str(tmp_path / "dn")]) == 0
    assert lin(tmp_path / "sp") / lin(tmp_path / "dn") == pytest.approx(0.5625)


def test_bad_folders_give_clear_errors(tmp_path, calib_file, capsys):
    src, pruned = _pruned(tmp_path, "llama", calib_file)
    out = tmp_path / "ft"
    _export(pruned, out)
    folder = out / "1-gpu"
    victim = next(folder.glob("*.values.bin"))
    data = victim.read_bytes()
    victim.write_bytes(data[:-2])
    with pytest.raises(EsparseError, match="truncated"):
        load_ft(out)
    victim.unlink()
    with pytest.raises(EsparseError, match="is missing"):
        load_ft(out)
    victim.write_bytes(data)
    (folder / "model.layers.0.mlp.up_proj.weight.1.values.bin").write_bytes(b"x")
    with pytest.raises(EsparseError, match="mixes"):
        load_ft(out)
    os.remove(folder / "model.layers.0.mlp.up_proj.weight.1.values.bin")
    load_ft(out)
    with pytest.raises(EsparseError, match="no 2-gpu"):
        load_ft(out, tp=2)
    ini = (folder / "config.ini").read_text()
    sums = (folder / "checksums.sha256").read_text()
    (folder / "config.ini").write_text(ini.replace("num_layer = 2", "num_layer = 3"))
    with pytest.raises(EsparseError, match="config.ini does not match its sha256"):  # format 2 covers config.ini
        load_ft(out)
    from esparse.format.ft_format import write_checksums

    write_checksums(folder, [line.split("  ")[1] for line in sums.splitlines()])  # an edit with the sums redone
    with pytest.raises(EsparseError, match="missing"):
        load_ft(out)
    (folder / "config.ini").write_text(ini.replace("format_version = 2", "format_version = 9"))
    with pytest.raises(EsparseError, match="format_version 9"):
        load_ft(out)
    # tp that does not divide the kv heads (2) is refused before writing anything
    assert main(["export", str(pruned), "--out", str(tmp_path / "tp4"), "--tp", "8"]) == 2
    assert "does not divide" in capsys.readouterr().err
    assert not (tmp_path / "tp4").exists()
    # a dense weight given to the compressed writer
    assert main(["export", str(src), "--out", str(tmp_path / "x"), "--overwrite"]) == 0


def test_llama7b_folder_size_ratio():
    """Bytes of a LLaMA-7B-shaped folder, from the same size table the writer and the loader check."""
    from esparse.format.ft_format import FTConfig, expected_files

    base = dict(arch="llama", hidden=4096, n_heads=32, n_kv=32, head_dim=128, inter=11008, n_layers=32,
                vocab=32000, max_pos=4096, eps=1e-6, dtype="fp16")
    dense = sum(expected_files(FTConfig(**base)).values())
    sparse = sum(expected_files(FTConfig(**base, sparsity="2:4", method="esparse",
                                         permuted=("attn_in", "attn_out", "mlp_in", "mlp_out"))).values())
    ratio = sparse / dense
    print(f"\nLLaMA-7B fp16 folder: dense {dense / 2**30:.3f} GiB, 2:4 {sparse / 2**30:.3f} GiB, {ratio:.4f}x")
    assert ratio <= 0.58
