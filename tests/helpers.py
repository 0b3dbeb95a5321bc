"""Shared test helpers."""
import json
from pathlib import Path

import numpy as np

from sparse_transformer import patterns as P


def tiny_images(root: Path, name: str = "imgs", shape=(4, 4, 3), counts=(("train", 20), ("val", 4))) -> Path:
    """A prepared image dataset of random pixels under root/name (as `data prepare` writes it)."""
    data = root / name
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    size = int(np.prod(shape))
    for split, count in counts:
        (data / f"{split}.bin").write_bytes(rng.integers(0, 256, count * size, dtype=np.uint8).tobytes())
    (data / "meta.json").write_text(json.dumps({"name": name, "modality": "image", "shape": list(shape),
                                                "splits": {s: c * size for s, c in counts}}))
    return data


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
