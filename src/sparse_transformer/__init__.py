"""sparse-transformer: Sparse Transformers (Child, Gray, Radford, Sutskever, 2019) in PyTorch."""
from . import patterns
from .attention import attention

__version__ = "0.1.0"
__all__ = ["attention", "patterns", "__version__"]
