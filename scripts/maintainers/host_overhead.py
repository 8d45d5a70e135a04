"""Device diagnostic: host microseconds per call of each layer of the sparse op, against F.linear.

Calls are issued back to back without a sync, so once the GPU queue fills the host is the limit: per-call time =
the host's cost of one call (each GEMM here takes the GPU ~10-30 us). Prints one line per path and M and writes
them, with the environment, to the JSON file named as the first argument (default host_overhead.json).
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from esparse.ft_plugin import ops
from esparse.python_api.random_weights import random_24
from esparse.report import environment, write_json


def host_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return 1e6 * host / calls


def paths(x, y, w, sw) -> dict:
    return {
        "F.linear (cuBLAS)": lambda: F.linear(x, w),
        "torch.empty_like + copy_ (two allocator/launch steps)": lambda: y.copy_(torch.empty_like(y)),
        "ops.dense_linear (cuBLASLt op)": lambda: ops.dense_linear(x, w),
        "torch.ops.esparse.sparse_linear (raw op, no Python checks)":
            lambda: torch.ops.esparse.sparse_linear(x, sw.obj, None, 0),
        "ops.sparse_linear (checks + bucket + op)": lambda: ops.sparse_linear(x, sw),
    }


def main() -> None:
    n, k = 4096, 4096
    w = random_24(n, k, "cuda")
    sw = ops.SparseWeight(w)
    print(f"cuSPARSELt {ops.CUSPARSELT.summary}, N=K={k}")
    rows = []
    for m in (1, 16, 128):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        sw.ensure_algo(m)
        y = torch.empty(m, n, device="cuda", dtype=torch.float16)
        for name, fn in paths(x, y, w, sw).items():
            rows.append({"m": m, "n": n, "k": k, "path": name, "host_us": host_us(fn)})
            print(f"M={m:4d}  {rows[-1]['host_us']:7.1f} us  {name}")
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "host_overhead.json")
    write_json(out, {"env": {**environment(), "cusparselt": ops.CUSPARSELT.summary}, "results": rows})


if __name__ == "__main__":
    main()
