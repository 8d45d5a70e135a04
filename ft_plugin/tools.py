"""What the plugin commands do (esparse tune, esparse env); the command line itself is esparse/cli.py."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path


def tune_folder(model: Path, m: str, dtype_name: str) -> list[str]:
    """Search (and cache) the algorithm of every 2:4 linear shape of an exported folder at each token count
    of ``m``; returns one line per shape."""
    import torch

    from esparse.devices import DTYPES
    from esparse.errors import EsparseError
    from esparse.format.ft_format import layer_prefix
    from esparse.format.ft_loader import FTFolder

    if not torch.cuda.is_available():
        raise EsparseError("esparse tune needs a CUDA GPU with sparse tensor cores (sm_80 or newer)")
    from esparse.ft_plugin import ops

    if not ops.CUSPARSELT.tuned:
        raise EsparseError(f"cuSPARSELt {ops.CUSPARSELT.version_str} runs its default algorithm only; nothing to "
                           f"tune. For tuned algorithms: {ops.cusparselt.install_command()}")
    src = FTFolder(model)
    if src.cfg.nm != (2, 4):
        raise EsparseError(f"{model} is {src.cfg.sparsity or 'dense'}: tuning is for 2:4 models")
    layer0 = {name: w.to_dense() for name, w in src.layer(0).linears.items()}  # every layer has these shapes
    dtype = DTYPES[dtype_name]
    try:
        ms = [int(v) for v in m.split(",")]
    except ValueError:
        raise EsparseError(f"--m takes comma-separated token counts, got {m!r}") from None
    if not ms or min(ms) < 1:
        raise EsparseError(f"--m token counts must be >= 1, got {m!r}")
    shapes: dict[tuple[int, int], torch.Tensor] = {}
    for d in layer0.values():
        shapes.setdefault(tuple(d.shape), d)
    fam = src.cfg.family
    if fam.gated_mlp:  # the runtime fuses gate and up into one GEMM
        gate, up = (f"{layer_prefix(0)}{f.stem}.weight" for f in fam.ft_linears if f.group == "mlp_in")
        fused = torch.cat([layer0[gate], layer0[up]])
        shapes.setdefault(tuple(fused.shape), fused)
    lines = []
    for (n, k), dense in shapes.items():
        sw = ops.SparseWeight(dense.to("cuda", dtype))
        for m in ms:
            sw.ensure_algo(m)
        lines.append(f"tuned N={n} K={k} for M in {ms}")
    lines.append(f"algorithms cached in {ops._cache.path}")
    return lines


def _driver_version() -> str:
    try:
        v = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0:
            return f"{v.value // 1000}.{v.value % 1000 // 10} (CUDA driver API)"
    except OSError:
        pass
    return "unknown"


def env_report() -> list[str]:
    """Lines for a bug report; never raises for a missing GPU or plugin."""
    import torch

    import esparse
    from esparse.ft_plugin import build_info, cusparselt

    lines = [f"esparse {esparse.__version__}, python {platform.python_version()}, "
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})"]
    if not torch.cuda.is_available():
        lines.append("GPU: none visible to torch; the sparse path needs an sm_80+ NVIDIA GPU (CPU runs --dense)")
        return lines
    cc = torch.cuda.get_device_capability()
    lines.append(f"GPU: {torch.cuda.get_device_name()} (sm_{cc[0]}{cc[1]}), driver {_driver_version()}")
    info = build_info()
    lines.append(f"plugin: {info.path or 'not built'} ({info.reason})")
    if info.built:
        try:
            from esparse.ft_plugin import ops

            c = ops.CUSPARSELT
            design = "tuned: searched algorithms, cached per shape" if c.tuned else "safe: default algorithm"
            lines.append(f"cuSPARSELt: {c.version_str} from {c.path} ({'private copy' if c.private else 'shared'}"
                         f" with the process; {design})")
            if not c.tuned:
                lines.append(f"  for tuned algorithms: {cusparselt.install_command()}")
            lines.append(f"algorithm cache: {ops._cache.path} ({len(ops._cache.rows)} rows)")
        except Exception as e:  # a report is still wanted when loading fails
            lines.append(f"plugin load failed: {e}")
    copies = cusparselt.mapped_copies()
    lines.append(f"cuSPARSELt files mapped in this process: {', '.join(map(str, copies)) or 'none'}")
    return lines
