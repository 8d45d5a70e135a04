"""The ``esparse generate`` and ``esparse bench`` subcommands."""

from __future__ import annotations

import tempfile
from pathlib import Path

from esparse import argtypes as at

DTYPES = ("fp16", "bf16", "fp32")


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="generate text from an exported folder (or a HF folder / .gguf)")
    g.add_argument("model", type=Path, help="folder written by esparse export; a HF folder or .gguf is exported first")
    g.add_argument("--prompt", type=at.prompt, action="append", required=True, help="prompt text (repeat for a batch)")
    path = g.add_mutually_exclusive_group()
    path.add_argument("--sparse", action="store_true", help="2:4 linears on cuSPARSELt (GPU)")
    path.add_argument("--dense", action="store_true", help="dense linears (default)")
    g.add_argument("--max-new-tokens", type=at.int_at_least(1), default=64)
    g.add_argument("--temperature", type=at.float_in(0.0), default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=at.float_in(0.0, 1.0, low_open=True), default=1.0)
    g.add_argument("--seed", type=at.int_at_least(0), default=0)
    g.add_argument("--device", type=at.device, default="auto")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="default fp16 on GPU, fp32 on CPU")
    g.add_argument("--cuda-graph", action="store_true", help="replay decode steps from a CUDA graph")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="dense vs sparse side by side: prefill latency, decode tokens/s, memory")
    b.add_argument("model", type=Path, nargs="?", help="exported 2:4 folder")
    b.add_argument("--shape", choices=("llama-7b", "llama-13b", "opt-6.7b"), help="random weights of a model shape")
    b.add_argument("--layers", type=at.int_at_least(1), default=None, help="override the number of layers (--shape)")
    b.add_argument("--batches", type=at.int_list, default="1,4,16,64")
    b.add_argument("--prompt-len", type=at.int_at_least(1), default=2048, help="prefill length")
    b.add_argument("--decode-steps", type=at.int_at_least(1), default=64)
    b.add_argument("--backends", default="dense,sparse", help="comma list of torch, dense, sparse")
    b.add_argument("--no-cuda-graph", action="store_true")
    b.add_argument("--out", type=Path, default=Path("results/bench"))
    b.set_defaults(func=cmd_bench)


def _ft_folder(model: Path, tmp: Path) -> Path:
    """An exported folder for ``model``: itself, or a fresh export of a HF folder / .gguf."""
    if (model / "config.ini").is_file() or any(model.glob("*-gpu/config.ini")):
        return model
    from esparse.converter.ft_export import export_folder

    export_folder(model, tmp / "ft", tp=1, dtype="fp16")
    return tmp / "ft"


def cmd_generate(args) -> None:
    import torch

    from esparse.converter.model_io import DTYPES as TORCH_DTYPES
    from esparse.converter.model_io import load_tokenizer
    from esparse.converter.pipeline import resolve_device
    from esparse.python_api import load_decoder
    from esparse.python_api.generate import generate

    dev = resolve_device(args.device)
    dtype = TORCH_DTYPES[args.dtype] if args.dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _ft_folder(args.model, Path(tmp))
        tok = load_tokenizer(folder if (folder / "tokenizer_config.json").is_file() else args.model)
        model = load_decoder(folder, device=str(dev), dtype=dtype, sparse=args.sparse)
        prompts = [tok(p).input_ids for p in args.prompt]
        outs = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_p,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id or 0, seed=args.seed,
                        cuda_graph=args.cuda_graph)
    for p, o in zip(args.prompt, outs):
        print(p + tok.decode(o, skip_special_tokens=True))
        print("-" * 40)


def cmd_bench(args) -> None:
    from esparse.python_api.bench import run_bench

    run_bench(args)
