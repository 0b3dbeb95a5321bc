"""Downloads that resume, retry, verify, and land atomically.

A transfer writes ``NAME.part`` next to its destination. An interrupted
transfer leaves the ``.part`` file, and the next attempt asks the server for
the rest with an HTTP Range request (starting over if the server ignores it).
The checksum is verified before the file is renamed to its final name, so a
file under its final name is always whole and verified; a mismatch deletes the
``.part`` file and raises. Standard library only (urllib).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, checksum: str | None) -> str | None:
    """Check ``path`` against ``"sha256:HEX"`` or ``"md5:HEX"``; raise ValueError on mismatch."""
    if not checksum:
        return None
    algorithm, _, want = checksum.partition(":")
    got = file_digest(path, algorithm)
    if got != want:
        raise ValueError(f"{path.name}: {algorithm} {got[:16]}... does not match the expected {want[:16]}...")
    return got


def _fetch_once(url: str, part: Path, timeout: float, progress: Callable[[int], None] | None) -> None:
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "sparse-transformer"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # asked for bytes past the end: the .part file is already whole
            return
        raise
    with resp:
        resumed = have and resp.status == 206
        total = resp.headers.get("Content-Length")
        expected = int(total) if total is not None else None
        got = 0
        with open(part, "ab" if resumed else "wb") as f:
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
                if progress:
                    progress(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    if expected is not None and got < expected:
        raise ConnectionError(f"connection closed after {got} of {expected} bytes")


def download(
    url: str, dest: Path, checksum: str | None = None, *, retries: int | None = None, timeout: float = 60.0,
    backoff: float = 1.0, progress: Callable[[int], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify ``checksum``, rename into place.

    An existing ``dest`` is verified and reused. Raises ValueError on a checksum
    mismatch and after ``retries`` failed attempts (default 5, or the
    environment variable SPARSE_TRANSFORMER_DOWNLOAD_RETRIES), naming the URL.
    """
    if retries is None:
        retries = max(1, int(os.environ.get("SPARSE_TRANSFORMER_DOWNLOAD_RETRIES", "5")))
    dest = Path(dest)
    if dest.exists():
        verify(dest, checksum)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(retries):
        try:
            _fetch_once(url, part, timeout, progress)
            break
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
            if isinstance(e, urllib.error.HTTPError) and e.code in (403, 404):
                raise ValueError(f"{url}: HTTP {e.code}") from None
            if isinstance(e, urllib.error.URLError) and isinstance(e.reason, socket.gaierror):
                raise ValueError(f"cannot reach {url} ({e.reason})") from None  # no network: no point retrying
            last = e
            if attempt + 1 < retries:
                time.sleep(backoff * 2**attempt)
    else:
        raise ValueError(f"could not download {url} after {retries} attempts ({last}); "
                         f"the partial file {part} is kept and the next try resumes it")
    try:
        verify(part, checksum)
    except ValueError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest
