"""The Sparse Transformer model: config, blocks, initialisation."""
from .config import ModelConfig
from .model import SparseTransformer

__all__ = ["ModelConfig", "SparseTransformer"]
