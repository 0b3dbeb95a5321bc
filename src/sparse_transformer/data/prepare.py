"""``sparse-transformer data prepare``: datasets as uint8 .bin files plus meta.json.

Each dataset is stored as ``DATA_DIR/NAME/{train,val[,test]}.bin`` (raw uint8,
read back with numpy memmap) and ``meta.json`` (modality, the shape of one
example, split sizes, source checksums). Images are in raster order, row then
column then channel (paper section 5.3 / 7.1); audio is 12 kHz 8-bit mu-law
(section 7.3). No pickle is written anywhere (CIFAR-10's own batches are read
with an unpickler that admits only numpy arrays).

Sources: ``--from PATH`` imports a local copy; otherwise the files are
downloaded from the dataset's canonical location into ``DATA_DIR/downloads``
(resumed, retried, checksum-verified; see download.py). The prepared folder is
built in a temporary folder and renamed into place, so it appears whole or not
at all, and an existing prepared dataset is never overwritten.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..sysutil import atomic_open, atomic_write_text, fsync_dir, make_dirs
from . import formats
from .download import download, file_digest, verify


@dataclass(frozen=True)
class Remote:
    """One file of a dataset at its canonical location."""

    file: str
    url: str
    checksum: str | None  # "sha256:HEX" or "md5:HEX"; None where the file itself has no published checksum


SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"  # of the 10^8 bytes inside the zip
CIFAR10_MD5 = {"c58f30108f718f92721af3b95e74349a": "python", "c32a1d4ab5d03f1284b67883e8d87530": "binary"}
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
HELD_OUT = 2000  # validation images held out from the end of the training set (the paper, CIFAR-10)
_FM_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SOURCES: dict[str, list[Remote]] = {
    "shakespeare": [Remote("input.txt", "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                           f"sha256:{SHAKESPEARE_SHA256}")],
    "enwik8": [Remote("enwik8.zip", "http://mattmahoney.net/dc/enwik8.zip", None)],
    "cifar10": [Remote("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "md5:c58f30108f718f92721af3b95e74349a")],
    "fashion-mnist": [Remote(f, _FM_URL + f, f"sha256:{h}") for f, h in FASHION_MNIST_SHA256.items()],
    # image-net.org serves these only after login, so they download only from a --mirror
    "imagenet64": [Remote(f, "", None) for f in
                   ("Imagenet64_train_part1_npz.zip", "Imagenet64_train_part2_npz.zip", "Imagenet64_val_npz.zip")],
}
NO_DOWNLOAD = {
    "imagenet64": "the downsampled ImageNet 64x64 files (Imagenet64_train_part1_npz.zip, ..._part2_npz.zip, "
                  "Imagenet64_val_npz.zip, or the .npz files inside) from https://image-net.org/download-images "
                  "(an account is needed) or a --mirror",
    "text": "one or more text files", "images": "a folder of PNG/JPEG images", "audio": "a WAV/FLAC/OGG file or folder",
}
NAMES = ("enwik8", "shakespeare", "cifar10", "imagenet64", "fashion-mnist", "text", "images", "audio")
Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- writing
def _write(out: Path, name: str, splits: dict[str, np.ndarray], meta: dict) -> dict:
    """Write every split and meta.json into a temporary folder, then rename it to ``out``."""
    tmp = _tmp_dir(out)
    try:
        for split, arr in splits.items():
            with atomic_open(tmp / f"{split}.bin") as f:
                f.write(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
        meta = {"name": name, **meta, "splits": {k: int(v.size) for k, v in splits.items()}}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        if out.exists():
            raise ValueError(f"{out} appeared while preparing; it is left as it is")
        tmp.rename(out)  # the folder appears whole or not at all
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _tmp_dir(out: Path) -> Path:
    if out.exists():
        raise ValueError(f"{out} already exists; remove it to prepare {out.name} again")
    try:
        make_dirs(out.parent)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except PermissionError:
        raise ValueError(f"cannot write into {out.parent}: permission denied") from None
    except OSError as e:
        raise ValueError(f"cannot write into {out.parent}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- sources
def _fetch(name: str, data_dir: Path, mirror: str | None, progress: Progress | None) -> Path:
    """Download ``name``'s files into DATA_DIR/downloads (verified); return that folder or the one file."""
    if name not in SOURCES or (not mirror and not all(r.url for r in SOURCES[name])):
        raise ValueError(f"{name}: cannot be downloaded; fetch {NO_DOWNLOAD[name]} and pass --from PATH")
    folder = data_dir / "downloads" / name
    remotes = SOURCES[name]
    for r in remotes:
        url = mirror.rstrip("/") + "/" + r.file if mirror else r.url
        if progress:
            progress(f"downloading {url}")
        try:
            download(url, folder / r.file, r.checksum)
        except PermissionError:
            raise ValueError(f"cannot write into {folder}: permission denied") from None
        except ValueError as e:
            if "does not match" in str(e):
                raise ValueError(f"{name}: {e}; the download was deleted") from None
            raise ValueError(f"{name}: {e}. Offline? Fetch {r.file} from {r.url} and pass --from PATH") from None
    return folder / remotes[0].file if len(remotes) == 1 else folder


def _source(name: str, source: Path | None, data_dir: Path, mirror: str | None, progress: Progress | None) -> Path:
    if source is None:
        return _fetch(name, data_dir, mirror, progress)
    if not source.exists():
        raise ValueError(f"{name}: --from {source} does not exist")
    return source


def _files_of(path: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if suffixes:
        files = [p for p in files if p.suffix.lower() in suffixes]
    if not files:
        what = "/".join(s.lstrip(".").upper() for s in suffixes) + " " if suffixes else ""
        raise ValueError(f"{path}: the folder holds no {what}files")
    return files


def _split(arr: np.ndarray, fractions: tuple[float, ...]) -> list[np.ndarray]:
    cuts = np.cumsum([int(len(arr) * f) for f in fractions[:-1]])
    return np.split(arr, cuts)


def _generic_splits(arr: np.ndarray, fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """train | val | test (when test_fraction > 0), in order, for the generic kinds."""
    if not test_fraction:
        train, val = _split(arr, (fraction, 1 - fraction))
        return {"train": train, "val": val}
    train, val, test = _split(arr, (fraction, 1 - fraction - test_fraction, test_fraction))
    return {"train": train, "val": val, "test": test}


def _sources(root: Path, files: list[Path]) -> list[dict]:
    """A count and one hash over the files' relative paths and contents: meta.json stays small for
    10,000 files (it used to list every absolute path)."""
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(root) if f != root and root in f.parents else Path(f.name)
        h.update(str(rel).encode() + b"\0" + bytes.fromhex(file_digest(f)))
    return [{"files": len(files), "from": root.name, "sha256_of_paths_and_contents": h.hexdigest()}]


# ----------------------------------------------------------------------------- one function per kind
def _shakespeare(path: Path, fraction: float) -> tuple[dict, dict]:
    f = path if path.is_file() else path / "input.txt"
    digest = verify(f, f"sha256:{SHAKESPEARE_SHA256}")
    train, val = _split(np.frombuffer(f.read_bytes(), dtype=np.uint8), (0.9, 0.1))
    return {"train": train, "val": val}, {"modality": "text", "shape": [], "sources": [{"file": f.name, "sha256": digest}]}


def _enwik8(path: Path, fraction: float) -> tuple[dict, dict]:
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                raw = z.read("enwik8")
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise ValueError(f"{path}: not a readable enwik8.zip ({e})") from None
    elif path.is_file():
        raw = path.read_bytes()
    else:
        raise ValueError(f"{path}: expected enwik8 or enwik8.zip")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != ENWIK8_SHA256:
        raise ValueError(f"{path}: the sha256 of its content {digest[:16]}... is not enwik8's {ENWIK8_SHA256[:16]}...")
    train, val, test = _split(np.frombuffer(raw, dtype=np.uint8), (0.9, 0.05, 0.05))  # 90M / 5M / 5M
    return ({"train": train, "val": val, "test": test},
            {"modality": "text", "shape": [], "sources": [{"file": path.name, "content_sha256": digest}]})


def _text(path: Path, fraction: float, test_fraction: float = 0.0) -> tuple[dict, dict]:
    files = _files_of(path)
    data = b"".join(f.read_bytes() for f in files)
    if len(data) < 3:
        raise ValueError(f"{path}: the input holds {len(data)} bytes; nothing to prepare")
    splits = _generic_splits(np.frombuffer(data, dtype=np.uint8), fraction, test_fraction)
    return splits, {"modality": "text", "shape": [], "sources": _sources(path, files)}


def _images_meta(splits: dict[str, np.ndarray], sources: list[dict]) -> tuple[dict, dict]:
    shape = list(next(iter(splits.values())).shape[1:])
    meta = {"modality": "image", "shape": shape, "examples": {k: len(v) for k, v in splits.items()}, "sources": sources}
    return {k: v.reshape(-1) for k, v in splits.items()}, meta


def _cifar10(path: Path, fraction: float) -> tuple[dict, dict]:
    sources = [{"file": path.name, "unverified": "an extracted folder has no published checksum"}]
    if path.is_file():
        md5 = file_digest(path, "md5")
        if md5 not in CIFAR10_MD5:
            raise ValueError(f"{path}: md5 {md5[:16]}... is neither CIFAR-10 python nor binary tarball's")
        sources = [{"file": path.name, "md5": md5}]
    train, test = formats.read_cifar10(path)
    return _images_meta({"train": train[:-HELD_OUT], "val": train[-HELD_OUT:], "test": test}, sources)


def _imagenet64(path: Path, fraction: float) -> tuple[dict, dict]:
    files = _files_of(path, (".npz", ".zip"))
    train = [f for f in files if "train" in f.name.lower()]
    val = [f for f in files if "val" in f.name.lower()]
    if not train or not val:
        raise ValueError(f"{path}: expected Imagenet64_train*.npz and Imagenet64_val*.npz files")
    sources = [{"file": f.name, "sha256": file_digest(f)} for f in train + val]
    return _images_meta({"train": formats.read_imagenet64_npz(train), "val": formats.read_imagenet64_npz(val)}, sources)


def _fashion_mnist(path: Path, fraction: float) -> tuple[dict, dict]:
    sources = []
    for fname, want in FASHION_MNIST_SHA256.items():
        f = path / fname
        if not f.is_file():
            raise ValueError(f"fashion-mnist: {f} is missing")
        sources.append({"file": fname, "sha256": verify(f, f"sha256:{want}")})
    train = formats.read_idx(path / "train-images-idx3-ubyte.gz")[..., None]  # (N, 28, 28, 1)
    test = formats.read_idx(path / "t10k-images-idx3-ubyte.gz")[..., None]
    return _images_meta({"train": train[:-HELD_OUT], "val": train[-HELD_OUT:], "test": test}, sources)


def _images(path: Path, fraction: float, test_fraction: float = 0.0, size: tuple[int, int] | None = None,
            channels: int = 3, resize: bool = False, progress: Progress | None = None) -> tuple[dict, dict]:
    files = formats.image_files(path)
    classes = {f.parent for f in files} - {path}
    if len(classes) > 1 and progress:
        progress(f"note: the images are in {len(classes)} subfolders (classes?); their labels are not used: "
                 "the model learns the images alone")
    if size is None:
        if resize:
            raise ValueError("--resize needs --size HxW, the size every image is resized to")
        with formats.pillow().open(files[0]) as im:
            size = (im.height, im.width)
    images = formats.read_images(files, size, channels, resize=resize)
    if len(images) < 2 + (test_fraction > 0):
        raise ValueError(f"{path}: {len(images)} images are too few for train, validation"
                         + (" and test splits" if test_fraction else " splits"))
    order = np.random.default_rng(0).permutation(len(images))  # fixed shuffle, then fraction / rest
    n = len(images)
    n_test = max(int(n * test_fraction), 1) if test_fraction else 0
    cut = min(max(int(n * fraction), 1), n - 1 - n_test)
    splits = {"train": images[order[:cut]], "val": images[order[cut : n - n_test]]}
    if n_test:
        splits["test"] = images[order[n - n_test :]]
    return _images_meta(splits, _sources(path, files))


def _audio(path: Path, fraction: float, test_fraction: float = 0.0) -> tuple[dict, dict]:
    files = _files_of(path, formats.AUDIO_SUFFIXES)
    stream = np.concatenate([formats.mu_law_encode(formats.read_audio(f)) for f in files])
    meta = {"modality": "audio", "shape": [], "sample_rate": formats.AUDIO_RATE, "encoding": "mu-law-8bit",
            "sources": _sources(path, files)}
    return _generic_splits(stream, fraction, test_fraction), meta


READERS = {"shakespeare": _shakespeare, "enwik8": _enwik8, "text": _text, "cifar10": _cifar10,
           "imagenet64": _imagenet64, "fashion-mnist": _fashion_mnist, "images": _images, "audio": _audio}


GENERIC = ("text", "images", "audio")


def prepare(
    name: str, source: str | Path | None = None, data_dir: str | Path = "data", fraction: float = 0.9, *,
    size: tuple[int, int] | None = None, channels: int = 3, mirror: str | None = None,
    progress: Progress | None = None, out_name: str | None = None, resize: bool = False, test_fraction: float = 0.0,
) -> dict:
    """Prepare dataset ``name`` into ``data_dir/name`` (``data_dir/out_name`` for text, images and audio);
    returns its meta.

    ``source``: a local copy (file, folder or archive); without it the files are downloaded
    (``mirror`` replaces the canonical base URL). For the generic kinds (text, images, audio):
    ``fraction`` is the training share, ``test_fraction`` an optional test share taken from the end,
    the validation split is the rest. ``size`` (height, width), ``resize`` and ``channels`` (1 or 3)
    apply to ``images``.
    """
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(NAMES)}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if not 0 <= test_fraction < 1 - fraction:
        raise ValueError(f"test fraction must be in [0, 1 - fraction) = [0, {1 - fraction:g}), got {test_fraction}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if name not in GENERIC and (out_name or test_fraction or resize):
        raise ValueError(f"--name, --test-fraction and --resize are for {', '.join(GENERIC)}; {name} has fixed splits")
    if out_name is not None and (not out_name or out_name in (".", "..") or "/" in out_name or "\\" in out_name
                                 or out_name.startswith(".")):
        raise ValueError(f"--name must be a plain folder name, got {out_name!r}")
    data_dir = Path(data_dir)
    out = data_dir / (out_name or name)
    if out.exists():
        raise ValueError(f"{out} already exists; remove it to prepare it again, or choose another --name")
    path = _source(name, Path(source) if source else None, data_dir, mirror, progress)
    if progress:
        progress(f"reading {path}")
    if name == "images":
        splits, meta = _images(path, fraction, test_fraction, size, channels, resize, progress)
    elif name in GENERIC:
        splits, meta = READERS[name](path, fraction, test_fraction)
    else:
        splits, meta = READERS[name](path, fraction)
    return _write(out, out_name or name, splits, meta)
