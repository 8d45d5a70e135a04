"""The plugin's ops, with the cuSPARSELt choice and the per-shape algorithm cache wired in.

``SparseWeight(w)`` compresses a 2:4 weight [N, K] (checked on the GPU); ``sparse_linear(x, w, bias, act)``
computes x W^T (+ bias, + act) on cuSPARSELt; ``dense_linear`` is its cuBLASLt twin. With a tuned-capable
cuSPARSELt (0.10+), the first call of an M bucket looks the shape up in the cache file and searches only when
it is not there; on 0.8.x every plan runs the default algorithm (see :mod:`esparse.ft_plugin.cusparselt`).
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass

import torch

from esparse.devices import NAMES
from esparse.errors import EsparseError

from . import build_info, cusparselt
from .algo_cache import AlgoCache, gpu_key, search_bucket

log = logging.getLogger(__name__)

ACT = {"none": 0, "relu": 1, "gelu": 2}
_info = build_info()
if not _info.built:
    raise EsparseError(f"esparse ft_plugin is unavailable: {_info.reason}")
torch.ops.load_library(str(_info.path))


def _plugin_error() -> EsparseError:
    """The error the last op recorded (the C++ side never throws across the op boundary)."""
    msg = torch.ops.esparse.last_error() or "unknown error in the esparse plugin"
    return EsparseError(msg.strip().splitlines()[0].removeprefix("esparse: "))


@dataclass(frozen=True)
class CusparseLtInfo:
    path: str
    version: tuple[int, int, int]
    private: bool  # loaded beside the process's own copy
    tuned: bool  # searched algorithms in use (else cuSPARSELt's default on every plan)

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def summary(self) -> str:
        """e.g. "0.10.0 (tuned, private /root/cslt/lib/libcusparseLt.so.0)": what every benchmark records."""
        return (f"{self.version_str} ({'tuned' if self.tuned else 'safe'}, {'private' if self.private else 'shared'} "
                f"{self.path})")


def _load_cusparselt() -> CusparseLtInfo:
    path, major, minor, patch, private, tuned = torch.ops.esparse.cusparselt_info(cusparselt.choose())
    if major < 0:
        raise _plugin_error()
    info = CusparseLtInfo(path, (major, minor, patch), private, tuned)
    if not tuned:
        log.warning("cuSPARSELt %s (%s) cannot reuse searched algorithms across plans: sparse GEMMs run its "
                    "default algorithm, correct but slower. For tuned algorithms: %s", info.version_str, path,
                    cusparselt.install_command())
    return info


CUSPARSELT = _load_cusparselt()
_cache = AlgoCache()
SEARCHES = 0  # cusparseLtMatmulSearch runs in this process (tests check that a warm cache runs none)
GEMM_DTYPES = {t: n for t, n in NAMES.items() if n in ("fp16", "bf16")}  # what the sparse GEMM takes


class SparseWeight:
    """A compressed 2:4 weight plus the M buckets whose algorithm is already chosen in this process."""

    def __init__(self, weight: torch.Tensor):
        if weight.dtype not in GEMM_DTYPES:
            raise EsparseError(f"sparse weights are fp16 or bf16, got {weight.dtype}; cast the model (--dtype fp16)")
        if weight.dim() != 2 or not weight.is_cuda:
            raise EsparseError(f"a sparse weight is a 2-D CUDA tensor [N, K], got {tuple(weight.shape)} on "
                               f"{weight.device}")
        n, k = weight.shape
        if n % 16 or k % 16:
            raise EsparseError(f"sparse weight [{n}, {k}]: cuSPARSELt needs N and K multiples of 16; keep this "
                               "layer dense")
        major, _ = torch.cuda.get_device_capability(weight.device)
        if major < 8:
            raise EsparseError(f"{torch.cuda.get_device_name(weight.device)} (sm_{major}x) has no sparse tensor "
                               "cores; use the dense path (--dense)")
        # Validated here too, so that the message names the fix (prune it, or keep the layer dense); the C++
        # check stays as the backstop for callers of the raw op.
        if not bool((weight.view(n, k // 4, 4) != 0).sum(-1).le(2).all()):
            raise EsparseError(f"weight [{n}, {k}] is not 2:4 sparse along its input dim; prune it "
                               "(esparse prune) or use the dense path")
        self.obj = torch.classes.esparse.SparseWeight()
        err = self.obj.build(weight)
        if err:
            raise _plugin_error()
        self.n, self.k = n, k
        self.dtype = GEMM_DTYPES[weight.dtype]
        self.gpu = gpu_key(torch.cuda.get_device_name(weight.device))
        self.tuned = bool(self.obj.tuned())
        self.ready: set[int] = set()
        self.handle = next(_HANDLES)
        _WEIGHTS[self.handle] = self

    def nbytes(self) -> int:
        return int(self.obj.nbytes())

    def ensure_algo(self, m: int) -> None:
        """Choose the algorithm of m's bucket once per process: from the cache file, else by searching."""
        bucket = search_bucket(m)
        if bucket in self.ready:
            return
        if self.tuned:
            key = (self.gpu, CUSPARSELT.version_str, self.dtype, bucket, self.n, self.k)
            found = _cache.get(key)
            if found is None:
                global SEARCHES
                SEARCHES += 1
                found = self.obj.search(bucket)
                if not found:
                    raise _plugin_error()
                alg, split = found
                _cache.put(key, alg, split)
                log.debug("searched %s: alg %d split-k %d", key, alg, split)
            elif not self.obj.set_algo(bucket, *found):
                raise _plugin_error()
        self.ready.add(bucket)


def _check_input(x: torch.Tensor, w: SparseWeight, bias: torch.Tensor | None) -> None:
    if x.dim() == 0 or x.shape[-1] != w.k:
        raise EsparseError(f"input {tuple(x.shape)} has {x.shape[-1] if x.dim() else 0} features, weight expects {w.k}")
    if GEMM_DTYPES.get(x.dtype) != w.dtype or not x.is_cuda:
        raise EsparseError(f"input is {x.dtype} on {x.device}; the weight is {w.dtype} on a GPU")
    if bias is not None and (bias.shape != (w.n,) or GEMM_DTYPES.get(bias.dtype) != w.dtype or not bias.is_cuda):
        raise EsparseError(f"bias {tuple(bias.shape)} {bias.dtype}: expected a [{w.n}] {w.dtype} CUDA tensor")


def sparse_linear(x: torch.Tensor, w: SparseWeight, bias: torch.Tensor | None = None, act: str = "none"):
    """x W^T (+ bias, + act). Inputs are checked here (cheap, host-side only) so that a C++ error never has to
    cross the op boundary; a CUDA-graph replay skips all of it."""
    _check_input(x, w, bias)
    return torch.ops.esparse.cusparselt_linear(x, w.handle, bias, ACT[act])


# The weights the traceable op can name: torch.compile passes plain ints through a graph, not script objects.
# Weak: a model that is dropped frees its compressed weights (a plain dict kept every weight of every model).
_WEIGHTS: weakref.WeakValueDictionary[int, SparseWeight] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("esparse::cusparselt_linear", mutates_args=())
def _cusparselt_linear(x: torch.Tensor, handle: int, bias: torch.Tensor | None, act: int) -> torch.Tensor:
    """The cuSPARSELt GEMM as an op torch.compile keeps whole (checks were done when the weight was built)."""
    w = _WEIGHTS[handle]
    w.ensure_algo(x.numel() // x.shape[-1])
    y = torch.ops.esparse.sparse_linear(x, w.obj, bias, act)
    if y is None:
        raise _plugin_error()
    return y


@_cusparselt_linear.register_fake
def _(x, handle, bias, act):
    return x.new_empty((*x.shape[:-1], _WEIGHTS[handle].n))


def plan_inits() -> int:
    """cuSPARSELt matmul plans built so far in this process: one per (shape, padded M, epilogue, algorithm,
    bias pointer), shared by every weight with that key."""
    return int(torch.ops.esparse.plan_inits())


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, act: str = "none"):
    if x.dim() == 0 or w.dim() != 2 or x.shape[-1] != w.shape[1] or x.dtype != w.dtype:
        raise EsparseError(f"dense_linear: input {tuple(x.shape)} {x.dtype} does not fit weight {tuple(w.shape)} "
                           f"{w.dtype}")
    return torch.ops.esparse.cublaslt_linear(x, w, bias, ACT[act])


@torch.library.custom_op("esparse::cublaslt_linear", mutates_args=())
def _cublaslt_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, act: int) -> torch.Tensor:
    """The cuBLASLt GEMM as an op torch.compile keeps whole."""
    y = torch.ops.esparse.dense_linear(x, w, bias, act)
    if y is None:
        raise _plugin_error()
    return y


@_cublaslt_linear.register_fake
def _(x, w, bias, act):
    return x.new_empty((*x.shape[:-1], w.shape[0]))
