"""Bytes of an exported LLaMA-7B-shaped folder, dense vs compressed 2:4, written for real from random weights.

    python bench/export_size.py --work /big/disk/tmp [--layers 32]

Builds a HF folder with random 2:4 fp16 weights of the LLaMA-7B shape (no download, no calibration: the
folder carries an esparse.json so the exporter treats it as pruned), exports it dense and 2:4, and prints the
bytes on disk. Needs about 2x the fp16 model in RAM and 3x on disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from esparse.converter.ft_export import export_folder
from esparse.format.pruned import META_FILE, PRUNED_FORMAT_VERSION
from esparse.report import environment, format_table, write_json


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.bin"))


def make_hf_folder(out: Path, layers: int) -> None:
    h, inter, vocab = 4096, 11008, 32000
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "tie_word_embeddings": False, "dtype": "float16", "bos_token_id": 1,
           "eos_token_id": 2}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def sparse(n: int, k: int) -> torch.Tensor:
        w = torch.randn(n, k, generator=g, dtype=torch.float32).half().view(n, -1, 4)
        keep = w.abs().float().topk(2, -1).indices
        return (w * torch.zeros_like(w).scatter_(-1, keep, 1)).view(n, k)

    sd = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g).half(),
          "lm_head.weight": torch.randn(vocab, h, generator=g).half(), "model.norm.weight": torch.ones(h).half()}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, (n, k) in {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
                             "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                             "mlp.down_proj": (h, inter)}.items():
            sd[p + name + ".weight"] = sparse(n, k)
        sd[p + "input_layernorm.weight"] = torch.ones(h).half()
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h).half()
    save_file(sd, str(out / "model.safetensors"))
    meta = {"format_version": PRUNED_FORMAT_VERSION, "pattern": "2:4", "method": "random"}
    (out / META_FILE).write_text(json.dumps(meta))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("results/export_size"))
    args = ap.parse_args()
    hf = args.work / "llama7b-hf"
    shutil.rmtree(args.work, ignore_errors=True)
    make_hf_folder(hf, args.layers)
    export_folder(hf, args.work / "sparse", overwrite=True)
    (hf / META_FILE).unlink()  # the same weights exported as a dense model
    export_folder(hf, args.work / "dense", overwrite=True)
    dense, sparse = folder_bytes(args.work / "dense"), folder_bytes(args.work / "sparse")
    rows = [["dense", dense, dense / 2**30, 1.0], ["2:4", sparse, sparse / 2**30, sparse / dense]]
    print(f"LLaMA-7B shape, {args.layers} layers, fp16, tp=1")
    print(format_table(["export", "bytes", "GiB", "ratio"], rows))
    write_json(args.out / "export_size.json", {"env": environment(), "layers": args.layers, "dense_bytes": dense,
                                               "sparse_bytes": sparse, "ratio": sparse / dense})
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
