"""esparse: entropy-based N:M sparsity (E-Sparse) for LLaMA- and OPT-family models.

Subpackages: ``esparse.converter`` (offline pruning and FasterTransformer export),
``esparse.ft_plugin`` (cuSPARSELt / cuBLASLt GEMMs as torch ops) and ``esparse.python_api`` (the decoder runtime).
"""

__version__ = "0.1.0"
