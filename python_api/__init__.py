"""Serving runtime: load an exported folder and run LLaMA/OPT with sparse (cuSPARSELt) or dense GEMMs."""

from .loader import build_decoder, load_decoder
from .model import Transformer

__all__ = ["Transformer", "build_decoder", "load_decoder"]
