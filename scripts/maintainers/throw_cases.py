"""Diagnostic: one esparse C++ error path per run (argv[1]); prints what came back instead of crashing."""
import sys

import torch

from esparse.ft_plugin import ops  # noqa: F401  (loads the plugin)

case = sys.argv[1]
h = torch.float16
if case == "info":  # error inside cusparselt_info: tuple fallback
    info = torch.ops.esparse.cusparselt_info("/nonexistent/libcusparseLt.so.0")
    print("info ->", info, torch.ops.esparse.last_error())
elif case == "build":  # error inside build: string fallback
    sw = torch.classes.esparse.SparseWeight()
    print("build ->", repr(sw.build(torch.ones(4, 4, device="cuda", dtype=h))))
elif case == "build_ok":
    sw = torch.classes.esparse.SparseWeight()
    print("build ok ->", repr(sw.build(torch.zeros(128, 256, device="cuda", dtype=h))))
elif case == "linear":  # error inside sparse_linear: undefined-tensor fallback
    sw = torch.classes.esparse.SparseWeight()
    sw.build(torch.zeros(128, 256, device="cuda", dtype=h))
    print("linear ->", torch.ops.esparse.sparse_linear(torch.zeros(4, 64, device="cuda", dtype=h), sw, None, 0),
          torch.ops.esparse.last_error())
elif case == "dense":  # error inside dense_linear
    x = torch.zeros(4, 64, device="cuda", dtype=torch.float32)
    print("dense ->", torch.ops.esparse.dense_linear(x, x, None, 0), torch.ops.esparse.last_error())
elif case == "search":
    sw = torch.classes.esparse.SparseWeight()
    sw.build(torch.zeros(128, 256, device="cuda", dtype=h))
    print("search ->", sw.search(16), torch.ops.esparse.last_error())
print("case", case, "returned", flush=True)
