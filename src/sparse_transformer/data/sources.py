"""Where the bytes come from: built-in corpora, files, and prepared folders."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Dataset:
    """Byte splits (uint8 arrays, possibly memory-mapped) plus what they are."""

    name: str
    splits: dict[str, np.ndarray]
    modality: str = "text"
    shape: list[int] = field(default_factory=list)  # one example's shape, for images
    root: Path | None = None  # the prepared folder, when there is one

    def split(self, name: str) -> np.ndarray:
        if name not in self.splits:
            raise ValueError(f"dataset {self.name!r} has no {name!r} split; it has {', '.join(self.splits)}")
        return self.splits[name]


def default_corpus() -> bytes:
    """Real English text available offline everywhere: the help topics shipped with Python."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def shared_data_dir() -> Path:
    return Path(os.environ.get("SPARSE_TRANSFORMER_DATA", "../shared/data"))


def _split_bytes(name: str, raw: bytes | np.ndarray, fraction: float) -> Dataset:
    arr = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray)) else raw
    cut = int(len(arr) * fraction)
    if cut < 2 or len(arr) - cut < 2:
        raise ValueError(f"{name}: {len(arr)} bytes is too little to split into train and validation")
    return Dataset(name, {"train": arr[:cut], "val": arr[cut:]})


def _prepared(path: Path) -> Dataset:
    meta = json.loads((path / "meta.json").read_text())
    splits = {}
    for split in meta.get("splits", {}):
        f = path / f"{split}.bin"
        if not f.is_file():
            raise ValueError(f"{path}: {f.name} is missing; run `sparse-transformer data prepare` again")
        splits[split] = np.memmap(f, dtype=np.uint8, mode="r")
    return Dataset(meta.get("name", path.name), splits, meta.get("modality", "text"), list(meta.get("shape", [])), path)


def load_dataset(name: str, train_fraction: float = 0.9, data_dir: str | Path = "data") -> Dataset:
    """``name``: "default", a prepared dataset under ``data_dir``, "shakespeare", or a path.

    A path may be a prepared folder (with meta.json) or any file, read as bytes
    and split ``train_fraction`` / rest.
    """
    if name == "default":
        return _split_bytes("default", default_corpus(), train_fraction)
    prepared = Path(data_dir) / name
    if (prepared / "meta.json").is_file():
        return _prepared(prepared)
    if name == "shakespeare":
        f = shared_data_dir() / "tinyshakespeare.txt"
        if f.is_file():
            return _split_bytes("shakespeare", f.read_bytes(), train_fraction)
        raise ValueError(
            f"tiny-shakespeare not found (looked in {prepared} and {f}); "
            "run `sparse-transformer data prepare shakespeare --from input.txt` or pass --data.name PATH"
        )
    path = Path(name)
    if path.is_dir():
        if (path / "meta.json").is_file():
            return _prepared(path)
        raise ValueError(f"{path} is a folder without meta.json; prepare it with `sparse-transformer data prepare`")
    if path.is_file():
        return _split_bytes(path.name, np.memmap(path, dtype=np.uint8, mode="r"), train_fraction)
    raise ValueError(
        f"dataset {name!r} not found: not a prepared dataset in {data_dir}/ and not a file; "
        f"run `sparse-transformer data prepare {name}` or pass --data.name PATH"
    )
