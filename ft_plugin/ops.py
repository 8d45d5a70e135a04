"""The plugin's ops, with the per-shape algorithm cache wired in.

``SparseWeight(w)`` compresses a 2:4 weight [N, K] (checked on the GPU); ``sparse_linear(x, w, bias, act)``
computes x W^T (+ bias, + act) on cuSPARSELt; ``dense_linear`` is its cuBLASLt twin. The first call of an
M bucket looks the shape up in the cache file and only searches when it is not there.
"""

from __future__ import annotations

import logging

import torch

from esparse.converter.errors import EsparseError

from . import build_info
from .algo_cache import AlgoCache, gpu_key, search_bucket

log = logging.getLogger(__name__)

ACT = {"none": 0, "relu": 1, "gelu": 2}
_info = build_info()
if not _info.built:
    raise EsparseError(f"esparse ft_plugin is unavailable: {_info.reason}")
torch.ops.load_library(str(_info.path))
_cache = AlgoCache()
SEARCHES = 0  # cusparseLtMatmulSearch runs in this process (tests check that a warm cache runs none)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


class SparseWeight:
    """A compressed 2:4 weight plus the M buckets whose algorithm is already chosen in this process."""

    def __init__(self, weight: torch.Tensor):
        if weight.dtype not in DTYPE_NAMES:
            raise EsparseError(f"sparse weights are fp16 or bf16, got {weight.dtype}")
        self.obj = torch.classes.esparse.SparseWeight(weight)
        self.n, self.k = weight.shape
        self.dtype = DTYPE_NAMES[weight.dtype]
        self.gpu = gpu_key(torch.cuda.get_device_name(weight.device))
        self.ready: set[int] = set()

    def nbytes(self) -> int:
        return int(self.obj.nbytes())

    def ensure_algo(self, m: int) -> None:
        bucket = search_bucket(m)
        if bucket in self.ready:
            return
        key = (self.gpu, self.dtype, bucket, self.n, self.k)
        found = _cache.get(key)
        if found is None:
            global SEARCHES
            SEARCHES += 1
            alg, split = self.obj.search(bucket)
            _cache.put(key, alg, split)
            log.debug("searched %s: alg %d split-k %d", key, alg, split)
        else:
            self.obj.set_algo(bucket, *found)
        self.ready.add(bucket)


def sparse_linear(x: torch.Tensor, w: SparseWeight, bias: torch.Tensor | None = None, act: str = "none"):
    m = x.numel() // x.shape[-1]
    w.ensure_algo(m)
    return torch.ops.esparse.sparse_linear(x, w.obj, bias, ACT[act])


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, act: str = "none"):
    return torch.ops.esparse.dense_linear(x, w, bias, ACT[act])
