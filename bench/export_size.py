"""Bytes of an exported LLaMA-shaped folder, dense vs compressed 2:4, written for real from random weights.

    python bench/export_size.py --work /big/disk/tmp [--shape llama-7b] [--layers 32]

Builds a HF folder with random 2:4 fp16 weights of a LLaMA shape (no download, no calibration: the
folder carries an esparse.json so the exporter treats it as pruned), exports it dense and 2:4, and prints the
bytes on disk (table, export_size.json, export_size.png). Needs about 2x the fp16 model in RAM and 3x on disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from esparse.converter.ft_export import export_folder
from esparse.format.ft_format import linear_specs
from esparse.format.pruned import META_FILE, PRUNED_FORMAT_VERSION
from esparse.format.shapes import hf_llama_config, llama_shapes, shape_config
from esparse.python_api.random_weights import random_24
from esparse.report import environment, format_table, new_figure, save_figure, write_json


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.bin"))


def make_hf_folder(out: Path, shape: str, layers: int) -> None:
    """A HF LLaMA folder of ``shape`` with random 2:4 fp16 linears, marked pruned (esparse.json)."""
    hf = hf_llama_config(shape, layers)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **hf, "tie_word_embeddings": False,
           "dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    h, vocab = hf["hidden_size"], hf["vocab_size"]
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g).half(),
          "lm_head.weight": torch.randn(vocab, h, generator=g).half(), "model.norm.weight": torch.ones(h).half()}
    ftc = shape_config(shape, layers)
    for i in range(layers):
        p = f"model.layers.{i}."
        for spec in linear_specs(ftc, i):  # the HF linears fused into each FT linear, with their widths
            for hf_name, n in zip(spec.hf, spec.segments, strict=True):
                sd[p + hf_name + ".weight"] = random_24(n, spec.k, "cpu", torch.float16, seed=len(sd))
        sd[p + "input_layernorm.weight"] = torch.ones(h).half()
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h).half()
    save_file(sd, str(out / "model.safetensors"))
    meta = {"format_version": PRUNED_FORMAT_VERSION, "pattern": "2:4", "method": "random"}
    (out / META_FILE).write_text(json.dumps(meta))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shape", default="llama-7b", choices=llama_shapes())
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--out", type=Path, default=Path("results/export_size"))
    args = ap.parse_args()
    hf = args.work / "llama7b-hf"
    shutil.rmtree(args.work, ignore_errors=True)
    layers = args.layers or shape_config(args.shape).n_layers
    make_hf_folder(hf, args.shape, layers)
    export_folder(hf, args.work / "sparse", overwrite=True)
    (hf / META_FILE).unlink()  # the same weights exported as a dense model
    export_folder(hf, args.work / "dense", overwrite=True)
    dense, sparse = folder_bytes(args.work / "dense"), folder_bytes(args.work / "sparse")
    rows = [["dense", dense, dense / 2**30, 1.0], ["2:4", sparse, sparse / 2**30, sparse / dense]]
    print(f"{args.shape} shape, {layers} layers, fp16, tp=1")
    print(format_table(["export", "bytes", "GiB", "ratio"], rows))
    write_json(args.out / "export_size.json", {"env": environment(), "shape": args.shape, "layers": layers,
                                               "dense_bytes": dense, "sparse_bytes": sparse, "ratio": sparse / dense})
    fig, ax = new_figure(figsize=(5, 4))
    ax.bar(["dense", "2:4"], [dense / 2**30, sparse / 2**30])
    ax.set_ylabel("GiB on disk (all tensors)")
    ax.set_title(f"{args.shape} export, fp16: 2:4 = {sparse / dense:.3f}x dense")
    save_figure(fig, args.out / "export_size.png")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
