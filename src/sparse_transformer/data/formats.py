"""Readers for the datasets' native formats, and the 8-bit mu-law audio codec.

Every reader returns uint8 arrays in the paper's raster order: images as
[N, H, W, C] (row, then column, then channel), audio as a 1-D stream of
mu-law bytes at 12 kHz. Bad input raises ValueError naming the file.
"""
from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import wave
import zipfile
from pathlib import Path

import numpy as np

from ..sysutil import atomic_open

AUDIO_RATE = 12_000  # the paper's audio: 12 kHz, 8-bit mu-law
MU = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


# ----------------------------------------------------------------------------- idx (MNIST, Fashion-MNIST)
def read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (optionally gzipped) as an array of its stated shape."""
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


# ----------------------------------------------------------------------------- CIFAR-10
class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR-10's batches (dicts of lists and numpy arrays) and refuses anything else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_planar_to_hwc(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)


def read_cifar10(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train [50000, 32, 32, 3], test [10000, 32, 32, 3]) from the python or binary tarball (or its folder)."""
    def members() -> dict[str, bytes]:
        if path.is_dir():
            return {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()}
        try:
            with tarfile.open(path) as tar:
                return {m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable CIFAR-10 tarball ({e})") from None

    files = members()
    names_py = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    names_bin = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    batches = []
    if all(n in files for n in names_py):
        for n in names_py:
            try:
                d = _ArraysOnly(io.BytesIO(files[n]), encoding="bytes").load()
                data = np.asarray(d[b"data"], dtype=np.uint8)
            except Exception as e:  # noqa: BLE001 - any failure here means a corrupt batch
                raise ValueError(f"{path}: {n} is not a CIFAR-10 batch ({e})") from None
            if data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{path}: {n} holds data of shape {data.shape}, expected [N, 3072]")
            batches.append(_cifar_planar_to_hwc(data))
    elif all(n in files for n in names_bin):
        for n in names_bin:
            raw = np.frombuffer(files[n], dtype=np.uint8)
            if raw.size % 3073:
                raise ValueError(f"{path}: {n} is not a whole number of 3073-byte records")
            batches.append(_cifar_planar_to_hwc(raw.reshape(-1, 3073)[:, 1:]))
    else:
        raise ValueError(f"{path}: no CIFAR-10 batches (data_batch_1..5, test_batch) found")
    return np.concatenate(batches[:5]), batches[5]


# ----------------------------------------------------------------------------- ImageNet 64x64
def _npz_members(f: Path) -> list[tuple[str, io.BytesIO | Path]]:
    if f.suffix.lower() != ".zip":
        return [(f.name, f)]
    try:
        with zipfile.ZipFile(f) as z:
            return [(f"{f.name}/{n}", io.BytesIO(z.read(n))) for n in sorted(z.namelist()) if n.endswith(".npz")]
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{f}: not a readable zip file ({e})") from None


def read_imagenet64_npz(files: list[Path]) -> np.ndarray:
    """Downsampled ImageNet .npz files, or zips of them (``data``: [N, 12288] channel-planar), as [N, 64, 64, 3]."""
    out = []
    for f, member in (m for path in files for m in _npz_members(path)):
        try:
            with np.load(member, allow_pickle=False) as z:
                data = z["data"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{f}: not a downsampled-ImageNet .npz file with a 'data' array ({e})") from None
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 64 * 64:
            raise ValueError(f"{f}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 [N, 12288]")
        out.append(np.ascontiguousarray(data.reshape(-1, 3, 64, 64).transpose(0, 2, 3, 1)))
    if not out:
        raise ValueError(f"{', '.join(map(str, files))}: no .npz files inside")
    return np.concatenate(out)


# ----------------------------------------------------------------------------- image folders
def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: the folder holds no PNG or JPEG files")
    return files


def pillow():
    """PIL.Image, or a ValueError naming the extra to install."""
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("images need Pillow: pip install 'sparse-transformer[images]'") from None
    return Image


def read_images(files: list[Path], size: tuple[int, int], channels: int = 3, resize: bool = False) -> np.ndarray:
    """Images as uint8 [N, H, W, channels] of ``size`` (height, width): resized to it (Lanczos) when
    ``resize``, else an image of another size is an error."""
    Image = pillow()
    from PIL import UnidentifiedImageError

    mode = {1: "L", 3: "RGB"}[channels]
    out = np.empty((len(files), size[0], size[1], channels), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                if (im.height, im.width) != tuple(size):
                    if not resize:
                        raise ValueError(f"{f}: the image is {im.height}x{im.width}, expected {size[0]}x{size[1]} "
                                         "(--resize HxW resizes every image)")
                    im = im.convert(mode).resize((size[1], size[0]), Image.Resampling.LANCZOS)
                out[i] = np.asarray(im.convert(mode)).reshape(size[0], size[1], channels)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{f}: not a readable image ({e})") from None
    return out


# ----------------------------------------------------------------------------- audio
def mu_law_encode(x: np.ndarray, mu: int = MU) -> np.ndarray:
    """Floats in [-1, 1] to 8-bit mu-law codes 0..255 (the paper's audio tokens)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    return np.rint((y + 1) / 2 * mu).astype(np.uint8)


def mu_law_decode(q: np.ndarray, mu: int = MU) -> np.ndarray:
    """8-bit mu-law codes to floats in [-1, 1] (float32)."""
    y = np.asarray(q, dtype=np.float64) / mu * 2 - 1
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu).astype(np.float32)


def read_audio(path: Path, rate: int = AUDIO_RATE) -> np.ndarray:
    """Decode a WAV/FLAC/OGG file, mix to mono, resample to ``rate`` Hz: float32 in [-1, 1]."""
    try:
        import soundfile as sf
    except ImportError:
        raise ValueError("audio needs the soundfile and scipy packages: pip install 'sparse-transformer[audio]'") from None
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError, OSError) as e:
        raise ValueError(f"{path}: cannot decode audio ({e})") from None
    mono = data.mean(axis=1)
    if sr != rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(sr), rate)
        mono = resample_poly(mono, rate // g, int(sr) // g).astype(np.float32)
    return mono


def write_wav(path: Path, codes: np.ndarray, rate: int = AUDIO_RATE) -> None:
    """Write mu-law codes as a 16-bit PCM mono WAV file, atomically."""
    pcm = np.clip(mu_law_decode(codes) * 32767, -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    with atomic_open(Path(path)) as f:
        f.write(buf.getvalue())
