"""``sparse-transformer sample``: text to stdout or a file, images as one PNG grid."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from .model import SparseTransformer
from .model.generate import generate
from .sysutil import atomic_write_bytes


def image_grid(images: np.ndarray, cols: int) -> bytes:
    """uint8 images [n, H, W, C] -> PNG bytes of a grid with 2-pixel gaps."""
    from PIL import Image

    n, H, W, C = images.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * (H + 2) + 2, cols * (W + 2) + 2, C), 128, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[2 + r * (H + 2) : 2 + r * (H + 2) + H, 2 + c * (W + 2) : 2 + c * (W + 2) + W] = img
    mode = "L" if C == 1 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if C == 1 else grid, mode).save(buf, format="PNG")
    return buf.getvalue()


def sample(
    model: SparseTransformer, *, n: int, temperature: float, seed: int, out: str | None,
    prompt: bytes = b"", length: int | None = None, complete: np.ndarray | None = None, progress=None,
    modality: str = "text", compile: bool = False,
) -> str:
    """Generate and write; returns a one-line summary (text samples themselves go to ``out`` or stdout).

    ``modality``: "text" (stdout or a file), "image" (one PNG grid; with
    ``complete``: original, kept top half, completions), "audio" (one 12 kHz
    WAV file, the samples one after another with a quarter second of silence).
    """
    shape = model.cfg.data_shape
    if modality == "audio":
        from .data.formats import AUDIO_RATE, mu_law_encode, write_wav

        if complete is not None:
            raise ValueError("--complete is for image models")
        length = length if length is not None else model.cfg.n_ctx - len(prompt)
        x = generate(model, n, length, temperature=temperature, prompt=prompt, seed=seed, progress=progress, compile=compile)
        gap = np.full(AUDIO_RATE // 4, mu_law_encode(np.zeros(1))[0], dtype=np.uint8)
        codes = np.concatenate([c for row in x.cpu().numpy().astype(np.uint8) for c in (row, gap)][:-1])
        path = Path(out or "samples.wav")
        write_wav(path, codes)
        return f"wrote {n} samples of {length} steps ({length / AUDIO_RATE:.2f} s each at {AUDIO_RATE} Hz) to {path}"
    if len(shape) == 3:  # images, raster order (row, column, channel)
        size = math.prod(shape)
        if model.cfg.n_ctx < size:
            raise ValueError(f"model.n_ctx={model.cfg.n_ctx} is smaller than one image ({size} bytes)")
        if prompt:
            raise ValueError("--prompt is for text models; use --complete INDEX for an image model")
        if complete is not None:
            keep = (shape[0] // 2) * shape[1] * shape[2]  # the top half
            x = generate(model, n, size - keep, temperature=temperature, prompt=bytes(complete[:keep]), seed=seed, progress=progress, compile=compile)
            half = np.zeros(size, dtype=np.uint8)
            half[:keep] = complete[:keep]
            images = np.concatenate([complete[None, :size], half[None], x.cpu().numpy().astype(np.uint8)])
            cols = n + 2
        else:
            x = generate(model, n, size, temperature=temperature, seed=seed, progress=progress, compile=compile)
            images = x.cpu().numpy().astype(np.uint8)
            cols = math.ceil(math.sqrt(n))
        path = Path(out or "samples.png")
        atomic_write_bytes(path, image_grid(images.reshape(-1, *shape), cols))
        return f"wrote {len(images)} images to {path}"
    if complete is not None:
        raise ValueError("--complete is for image models; use --prompt TEXT for a text model")
    length = length if length is not None else min(500, model.cfg.n_ctx - len(prompt))
    x = generate(model, n, length, temperature=temperature, prompt=prompt, seed=seed, progress=progress, compile=compile)
    texts = [bytes(row.tolist()).decode("utf-8", errors="replace") for row in x.cpu()]
    body = texts[0] if n == 1 else "".join(f"=== sample {i} ===\n{t}\n" for i, t in enumerate(texts))
    if out in (None, "-"):
        print(body)
        return f"{n} samples of {length} bytes"
    atomic_write_bytes(Path(out), body.encode("utf-8"))
    return f"wrote {n} samples of {length} bytes to {out}"
