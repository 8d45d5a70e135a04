"""``esparse tune``: pre-search the cuSPARSELt algorithm of every linear shape of a model."""

from __future__ import annotations

from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("tune", help="pre-search cuSPARSELt algorithms for every linear shape of an exported model")
    p.add_argument("model", type=Path, help="exported 2:4 folder (esparse export)")
    p.add_argument("--m", default="1,8,16,32,64,128,256,512,1024,2048,4096", help="token counts to tune")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> None:
    import torch

    from esparse.converter.errors import EsparseError
    from esparse.converter.ft_loader import load_ft

    if not torch.cuda.is_available():
        raise EsparseError("esparse tune needs a CUDA GPU with sparse tensor cores (sm_80 or newer)")
    from esparse.ft_plugin import ops

    w = load_ft(args.model)
    if w.cfg.nm != (2, 4):
        raise EsparseError(f"{args.model} is {w.cfg.sparsity or 'dense'}: tuning is for 2:4 models")
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    ms = [int(v) for v in args.m.split(",")]
    shapes: dict[tuple[int, int], torch.Tensor] = {}
    layer0 = [n for n in w.linears if n.startswith("model.layers.0.")]
    for name in layer0:
        d = w.dense(name)
        shapes.setdefault(tuple(d.shape), d)
    if w.cfg.arch == "llama":  # the runtime fuses gate and up into one GEMM
        gate = w.dense("model.layers.0.mlp.gate_proj.weight")
        fused = torch.cat([gate, w.dense("model.layers.0.mlp.up_proj.weight")])
        shapes.setdefault(tuple(fused.shape), fused)
    for (n, k), dense in shapes.items():
        sw = ops.SparseWeight(dense.to("cuda", dtype))
        for m in ms:
            sw.ensure_algo(m)
        print(f"tuned N={n} K={k} for M in {ms}")
    print(f"algorithms cached in {ops._cache.path}")
