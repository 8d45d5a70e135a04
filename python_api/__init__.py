"""Serving runtime: load an exported folder and run LLaMA/OPT with sparse (cuSPARSELt) or dense GEMMs."""

from .model import Decoder, load_decoder

__all__ = ["Decoder", "load_decoder"]
