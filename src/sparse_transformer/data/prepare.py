"""``sparse-transformer data prepare``: bytes on disk as uint8 .bin files plus meta.json.

Implemented so far: ``shakespeare``, ``text`` and ``fashion-mnist``, from local
files (``--from``). Every file lands atomically; a prepared dataset that is
already there is never overwritten (remove it first). No pickle anywhere.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..sysutil import atomic_open, atomic_write_text

SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FASHION_MNIST_VAL = 2000  # held out from the end of the training images, as the paper does for CIFAR-10
NAMES = ("shakespeare", "text", "fashion-mnist")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _need_from(name: str, what: str, source: Path | None) -> Path:
    if source is None:
        raise ValueError(f"{name}: no network download in this version; fetch {what} and pass --from PATH")
    if not source.exists():
        raise ValueError(f"{name}: --from {source} does not exist")
    return source


def _write(out: Path, name: str, splits: dict[str, np.ndarray], meta: dict) -> dict:
    """Write every split and meta.json into a temporary folder, then rename it to ``out``."""
    if out.exists():
        raise ValueError(f"{out} already exists; remove it to prepare {name} again")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except PermissionError:
        raise ValueError(f"cannot write into {out.parent}: permission denied") from None
    try:
        for split, arr in splits.items():
            with atomic_open(tmp / f"{split}.bin") as f:
                f.write(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
        meta = {"name": name, **meta, "splits": {k: int(v.size) for k, v in splits.items()}}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        tmp.rename(out)  # the folder appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _text(name: str, data: bytes, fraction: float, sources: list[dict]) -> tuple[dict, dict]:
    if len(data) < 2:
        raise ValueError(f"{name}: the input holds {len(data)} bytes; nothing to prepare")
    arr = np.frombuffer(data, dtype=np.uint8)
    cut = int(len(arr) * fraction)
    return {"train": arr[:cut], "val": arr[cut:]}, {"modality": "text", "shape": [], "sources": sources}


def _read_idx(path: Path) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: not a readable idx file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated idx file ({body.size} of {int(np.prod(dims))} bytes)")
    return body.reshape(dims)


def prepare(name: str, source: str | Path | None = None, data_dir: str | Path = "data", fraction: float = 0.9) -> dict:
    """Prepare dataset ``name`` into ``data_dir/name``; returns its meta."""
    if name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(NAMES)} (more to come)")
    src = Path(source) if source else None
    out = Path(data_dir) / name
    if name == "shakespeare":
        path = _need_from(name, "tiny-shakespeare's input.txt", src)
        digest = sha256(path)
        if digest != SHAKESPEARE_SHA256:
            raise ValueError(f"{path}: sha256 {digest[:16]}... is not tiny-shakespeare's {SHAKESPEARE_SHA256[:16]}...")
        splits, meta = _text(name, path.read_bytes(), 0.9, [{"file": path.name, "sha256": digest}])
    elif name == "text":
        path = _need_from(name, "one or more text files", src)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"{path}: the folder holds no files")
        data = b"".join(f.read_bytes() for f in files)
        splits, meta = _text(name, data, fraction, [{"file": str(f), "sha256": sha256(f)} for f in files])
    else:  # fashion-mnist
        folder = _need_from(name, "the four Fashion-MNIST idx .gz files", src)
        sources = []
        for fname, want in FASHION_MNIST_SHA256.items():
            f = folder / fname
            if not f.is_file():
                raise ValueError(f"{name}: {f} is missing")
            got = sha256(f)
            if got != want:
                raise ValueError(f"{f}: sha256 {got[:16]}... does not match the known {want[:16]}...")
            sources.append({"file": fname, "sha256": got})
        train = _read_idx(folder / "train-images-idx3-ubyte.gz")
        test = _read_idx(folder / "t10k-images-idx3-ubyte.gz")
        splits = {"train": train[:-FASHION_MNIST_VAL].reshape(-1), "val": train[-FASHION_MNIST_VAL:].reshape(-1),
                  "test": test.reshape(-1)}
        meta = {"modality": "image", "shape": [28, 28, 1], "examples": {"train": len(train) - FASHION_MNIST_VAL,
                "val": FASHION_MNIST_VAL, "test": len(test)}, "sources": sources}
    return _write(out, name, splits, meta)
