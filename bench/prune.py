"""Pruning speed: E-Sparse (stats, GNS + LBS, masks) on a random model of a named shape, timed per stage.

    python bench/prune.py --shape llama-7b [--nsamples 128 --seqlen 2048] [--method esparse]

The model is built with random weights directly on the GPU (no download); calibration tokens are random ids
(the time does not depend on the text). Prints a table, writes prune.json and prune.png under --out.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from esparse.converter.prune import PruneConfig, prune_model
from esparse.format.shapes import hf_llama_config, llama_shapes
from esparse.report import environment, format_table, new_figure, save_figure, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=llama_shapes(), default="llama-7b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    ap.add_argument("--method", choices=("esparse", "wanda", "magnitude", "sparsegpt"), default="esparse")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("results/prune"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = hf_llama_config(args.shape, args.layers)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    with torch.device(args.device):
        model = LlamaForCausalLM(LlamaConfig(**spec, use_cache=False)).to(dtype).eval()
    build_s = time.perf_counter() - t0
    calib = torch.randint(0, spec["vocab_size"], (args.nsamples, args.seqlen),
                          generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig.for_method(args.method)
    t0 = time.perf_counter()
    res = prune_model(model, calib, cfg, args.device)
    total = time.perf_counter() - t0
    rows = [[k, v] for k, v in res.stage_seconds.items()] + [["total", total]]
    env = environment()
    print(f"{args.shape} ({spec['num_hidden_layers']} layers), {args.method} 2:4, {args.nsamples} x {args.seqlen} "
          f"calibration tokens on {env['device']} (model built in {build_s:.1f} s)")
    print(format_table(["stage", "seconds"], rows))
    write_json(args.out / "prune.json", {"env": env, "shape": args.shape, "layers": spec["num_hidden_layers"],
                                         "method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen,
                                         "stage_seconds": res.stage_seconds, "total_seconds": total})
    fig, ax = new_figure(figsize=(7, 4))
    ax.barh(list(res.stage_seconds), list(res.stage_seconds.values()))
    ax.set_xlabel("seconds")
    ax.set_title(f"{args.method} 2:4 pruning of {args.shape}: {total:.0f} s on {env['device']}")
    save_figure(fig, args.out / "prune.png")
    print(f"wrote {args.out}/prune.json and prune.png")


if __name__ == "__main__":
    main()
