"""Attention patterns (paper section 4.3): index arithmetic only.

Each pattern answers "may query i attend key j?" exactly, for any length n,
can draw itself with ``.mask(n)``, and describes itself to the fused kernel with
``.tiles(n, tile)`` (tiles.py). Every pattern registers itself under a spec
name (registry.py): ``parse("fixed:128:16")`` is ``Fixed(128, 16)``. ``.factors()`` gives the components that
section 5.1 combines across heads or layers.
"""
from .base import Pattern
from .registry import names, parse, register, spec, usage
from .dense import Dense
from .fixed import Fixed, FixedBlock, FixedSummary
from .custom import Custom
from .local import Local
from .strided import Strided, StridedColumns
from .tiles import Tiles

__all__ = ["Pattern", "Dense", "Local", "Strided", "StridedColumns", "Fixed", "FixedBlock", "FixedSummary",
           "Custom", "Tiles", "names", "parse", "register", "spec", "usage"]


def _import_every_pattern_file() -> None:
    """Import every module of this package, so that a pattern added as one new file registers itself,
    and export each registered class here (``patterns.DilatedWindow``)."""
    import importlib
    import pkgutil

    from .registry import _REGISTRY

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    for cls, _ in _REGISTRY.values():
        globals().setdefault(cls.__name__, cls)
        if cls.__name__ not in __all__:
            __all__.append(cls.__name__)


_import_every_pattern_file()
