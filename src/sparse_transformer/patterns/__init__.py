"""Attention patterns (paper section 4.3): index arithmetic only.

Each pattern answers "may query i attend key j?" exactly, for any length n,
and can draw itself with ``.mask(n)``. Every pattern registers itself under a spec
name (registry.py): ``parse("fixed:128:16")`` is ``Fixed(128, 16)``. ``.factors()`` gives the components that
section 5.1 combines across heads or layers.
"""
from .base import Pattern
from .registry import names, parse, register, spec, usage
from .dense import Dense
from .fixed import Fixed, FixedBlock, FixedSummary
from .local import Local
from .strided import Strided, StridedColumns

__all__ = ["Pattern", "Dense", "Local", "Strided", "StridedColumns", "Fixed", "FixedBlock", "FixedSummary",
           "names", "parse", "register", "spec", "usage"]
