"""Data: byte corpora, splits and deterministic batching."""
from .batching import batch_indices, get_batch
from .sources import Dataset, load_dataset

__all__ = ["Dataset", "load_dataset", "batch_indices", "get_batch"]
