"""Which tokenizer files a model or exported folder carries, how they are copied, and how they are read: only
regular files inside the folder (a link out of it is refused, so a hostile folder cannot make esparse read or
copy a file from elsewhere into an output the user may publish).

An exported folder (format 2) also lists its tokenizer files with their sha256 in ``tokenizer.sha256`` beside
them, verified before the tokenizer is read: a changed vocabulary would silently turn the same ids into other
text. A tokenizer whose ids run past the model's embedding table is refused where the two meet
(:func:`check_tokenizer_fits`), and so is a prompt that tokenizes to nothing (:func:`encode_prompts`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from esparse.errors import EsparseError

from .ft_format import read_manifest, verify_checksums, write_checksums

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


def check_no_outside_links(folder: Path) -> None:
    """Refuse files of a model folder that are links leading outside it: esparse would read (and copy into
    its outputs) whatever they point at."""
    root = Path(folder).resolve()
    for f in Path(folder).iterdir():
        if f.is_symlink() and root not in f.resolve().parents:
            raise EsparseError(f"{f} is a symbolic link to {f.resolve()}, outside the model folder; esparse reads "
                               "only files inside it: replace the link by the file itself")


TOKENIZER_MANIFEST = "tokenizer.sha256"


def write_tokenizer_manifest(folder: Path) -> None:
    """List the tokenizer files of an export's top folder with their sha256 (an empty list when it has none)."""
    write_checksums(folder, [n for n in TOKENIZER_FILES if (Path(folder) / n).is_file()], TOKENIZER_MANIFEST)


def _export_version(folder: Path) -> int:
    """format_version of the export whose tokenizer lives in ``folder`` (0 when it is not an export)."""
    import configparser

    versions = [0]
    for ini in Path(folder).glob("*-gpu/config.ini"):
        cp = configparser.ConfigParser(interpolation=None)
        try:
            cp.read(ini)
            versions.append(int(cp["esparse"]["format_version"]))
        except (OSError, KeyError, ValueError, configparser.Error):
            continue  # the loader names what is wrong with it
    return max(versions)


def verify_tokenizer_files(folder: Path) -> None:
    """Tokenizer files of an exported folder against ``tokenizer.sha256``: required from format 2 on, every
    present tokenizer file listed and unchanged."""
    folder = Path(folder)
    sums = read_manifest(folder, TOKENIZER_MANIFEST)
    if sums is None:
        if _export_version(folder) >= 2:
            raise EsparseError(f"{folder / TOKENIZER_MANIFEST} is missing: the exported folder was changed after "
                               "export; re-run esparse export")
        return
    present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    verify_checksums(folder, present, TOKENIZER_MANIFEST)
    gone = sorted(set(sums) - set(present))
    if gone:
        raise EsparseError(f"{folder / gone[0]} is listed in {TOKENIZER_MANIFEST} but missing: restore it or re-run "
                           "esparse export")


def load_folder_tokenizer(path: Path):
    """The tokenizer of a HF or exported folder (an export's tokenizer files verified first)."""
    from transformers import AutoTokenizer

    if Path(path).is_dir():
        check_no_outside_links(path)
        verify_tokenizer_files(Path(path))
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a corrupt config/tokenizer file surfaces as any error type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise EsparseError(f"cannot load a tokenizer from {path} ({type(e).__name__}: {first}); its tokenizer or "
                           "config files are corrupt") from e


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer (and generation config) files of a HF folder, whichever of them exist.

    Only regular files inside the folder are copied: a symbolic link is refused, so a hostile model folder
    cannot make esparse copy a file from elsewhere (a private key) into an output the user may publish."""
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_symlink():
            raise EsparseError(f"{f} is a symbolic link; esparse copies only regular files from a model folder: "
                               "replace the link by the file itself")
        if f.is_file():
            shutil.copyfile(f, Path(dst) / name, follow_symlinks=False)


def check_tokenizer_fits(tokenizer, vocab: int, where: str) -> None:
    """Every id the tokenizer can produce must index the model's embedding table (``vocab`` rows): a larger id
    is an index error deep inside the model, or reads another token's row."""
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= vocab:
        raise EsparseError(f"the tokenizer of {where} has ids up to {top}, but the model embeds only {vocab} tokens: "
                           "the tokenizer files belong to another model; use the model's own tokenizer")


def encode_prompts(tokenizer, prompts: list[str], vocab: int) -> list[list[int]]:
    """Token ids of each prompt, refusing one that tokenizes to nothing or to an id the model cannot embed."""
    out = []
    for p in prompts:
        ids = list(tokenizer(p).input_ids)
        if not ids:
            raise EsparseError(f"the prompt {p[:40]!r} tokenizes to no tokens: give some text the tokenizer keeps")
        if max(ids) >= vocab or min(ids) < 0:
            raise EsparseError(f"the prompt {p[:40]!r} tokenizes to id {max(ids)}, outside the model's {vocab} "
                               "tokens: the tokenizer belongs to another model")
        out.append(ids)
    return out
