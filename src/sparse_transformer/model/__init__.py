"""The Sparse Transformer model: config, blocks, initialisation."""
from .config import ModelConfig
from .model import SparseTransformer, nll

__all__ = ["ModelConfig", "SparseTransformer", "nll"]
