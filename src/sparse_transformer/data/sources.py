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


MODALITIES = ("text", "image", "audio")


def _read_meta(path: Path) -> dict:
    """meta.json of a prepared folder, checked; every error names the file."""
    f = path / "meta.json"
    try:
        meta = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e}); run `sparse-transformer data prepare` again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{f} must hold a JSON object, got {type(meta).__name__}")
    splits, shape = meta.get("splits"), meta.get("shape", [])
    if not isinstance(splits, dict) or not splits or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in splits.items()):
        raise ValueError(f"{f}: 'splits' must map split names to byte counts, got {splits!r}")
    if meta.get("modality", "text") not in MODALITIES:
        raise ValueError(f"{f}: 'modality' must be one of {', '.join(MODALITIES)}, got {meta.get('modality')!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"{f}: 'shape' must be a list of positive integers, got {shape!r}")
    return meta


def _prepared(path: Path) -> Dataset:
    """A prepared folder; each split's size is checked against meta.json (a cut or grown file is an error)."""
    meta = _read_meta(path)
    shape = list(meta.get("shape", []))
    example = int(np.prod(shape)) if shape else 1
    splits = {}
    for split, size in meta["splits"].items():
        f = path / f"{split}.bin"
        if not f.is_file():
            raise ValueError(f"{path}: {f.name} is missing; run `sparse-transformer data prepare` again")
        actual = f.stat().st_size
        if actual != size:
            raise ValueError(f"{f} holds {actual:,} bytes but {path / 'meta.json'} says {size:,}: the file is "
                             "truncated or changed; run `sparse-transformer data prepare` again")
        if size % example:
            raise ValueError(f"{f}: {size:,} bytes is not a whole number of examples of shape {shape}")
        splits[split] = np.memmap(f, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    return Dataset(meta.get("name", path.name), splits, meta.get("modality", "text"), shape, path)


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
