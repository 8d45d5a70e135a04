"""Reporting helpers shared by the benchmarks and the CLI: where a number was measured, tables, JSON."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from pathlib import Path

import torch


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


SOURCE_DIRS = ("converter", "python_api", "ft_plugin", "esparse")


def source_digest(root: Path | None = None) -> str:
    """sha256 (12 hex digits) of esparse's own source files (Python, C++, shell) as they are on disk: names a
    number's code even where git's metadata is missing or stale (a copied working tree on a device machine)."""
    root = root or Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for f in sorted((root / d).rglob("*")):
            if f.suffix in (".py", ".cpp", ".h", ".sh") and f.is_file() and "__pycache__" not in f.parts:
                h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def environment() -> dict:
    """Where a number was measured: device (with driver and clocks on a GPU), torch and CUDA, the commit
    (with "-dirty" when the tree had uncommitted changes) and the source digest, so a number is never pinned
    to the wrong code."""
    here = Path(__file__).resolve().parent
    commit = _run(["git", "rev-parse", "--short", "HEAD"], here)
    if commit and _run(["git", "status", "--porcelain", "--untracked-files=no"], here):
        commit += "-dirty"
    env = {"device": f"CPU ({platform.processor() or platform.machine()})", "torch": torch.__version__,
           "python": platform.python_version(), "commit": commit, "source": source_digest()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(device=torch.cuda.get_device_name(), compute_capability=f"sm_{p.major}{p.minor}",
                   cuda=torch.version.cuda)
        smi = _run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                    "--format=csv,noheader", "-i", str(torch.cuda.current_device())])
        if smi:
            env["nvidia_smi"] = "driver, max SM clock, max memory clock, power limit: " + smi
    return env


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.rename(path)


def new_figure(*args, **kwargs):
    """``plt.subplots`` on the headless Agg backend: the one way a benchmark starts its PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write ``path`` (through a temporary file, renamed when complete) and free the figure."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=dpi)
    tmp.rename(path)
    plt.close(fig)
