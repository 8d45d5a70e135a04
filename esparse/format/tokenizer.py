"""Which tokenizer files a model or exported folder carries, how they are copied, and how they are read: only
regular files inside the folder (a link out of it is refused, so a hostile folder cannot make esparse read or
copy a file from elsewhere into an output the user may publish)."""

from __future__ import annotations

import shutil
from pathlib import Path

from esparse.errors import EsparseError

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


def load_folder_tokenizer(path: Path):
    """The tokenizer of a HF or exported folder."""
    from transformers import AutoTokenizer

    if Path(path).is_dir():
        check_no_outside_links(path)
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
