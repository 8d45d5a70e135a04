"""The ``esparse export`` subcommand."""

from __future__ import annotations

from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="write FasterTransformer weight files (compressed N:M for pruned models)")
    p.add_argument("model", type=Path, help="folder written by esparse prune, or a dense HF LLaMA/OPT folder / .gguf")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tp", type=int, default=1, choices=(1, 2, 4, 8), help="tensor-parallel size")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    from esparse.converter.ft_export import export_folder

    rep = export_folder(args.model, args.out, args.tp, args.dtype, args.overwrite)
    print(rep.summary())
    print(f"wrote {args.out}/{args.tp}-gpu")
