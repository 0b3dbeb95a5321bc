"""Shared test helpers."""
from sparse_transformer import patterns as P


def every_pattern(stride: int, c: int) -> list:
    """One of each pattern and factor, with distinct-head variants."""
    return [
        P.Dense(),
        P.Local(stride),
        P.Strided(stride),
        P.StridedColumns(stride),
        P.Fixed(stride, c),
        P.Fixed(stride, c, distinct_heads=True),
        P.FixedBlock(stride),
        P.FixedSummary(stride, c),
        P.FixedSummary(stride, c, distinct_heads=True),
    ]
