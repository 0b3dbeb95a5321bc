"""Downloads from a local HTTP server: whole, cut and resumed, and a checksum mismatch, in each real format."""
import gzip
import hashlib
import http.server
import io
import pickle
import subprocess
import sys
import tarfile
import threading
import zipfile

import numpy as np
import pytest

from sparse_transformer.data import load_dataset
from sparse_transformer.data import prepare as prep
from sparse_transformer.data.download import download


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    cut: set[str] = set()  # paths whose next response stops halfway
    log: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 - the stdlib's name
        path = self.path.lstrip("/")
        self.log.append((path, self.headers.get("Range")))
        body = self.files.get(path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        part = body[start:]
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if path in self.cut:
            self.cut.discard(path)
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.cut, _Handler.log = {}, set(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", _Handler
    httpd.shutdown()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_download_whole_cut_resumed_and_mismatch(server, tmp_path):
    url, h = server
    body = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    h.files["f.bin"] = body
    out = download(f"{url}/f.bin", tmp_path / "f.bin", f"sha256:{_sha(body)}", backoff=0)
    assert out.read_bytes() == body and h.log == [("f.bin", None)]

    h.log.clear()
    h.cut.add("f.bin")
    out = download(f"{url}/f.bin", tmp_path / "g.bin", f"sha256:{_sha(body)}", backoff=0)
    assert out.read_bytes() == body
    assert h.log[0] == ("f.bin", None) and h.log[1][1] == f"bytes={len(body) // 2}-"  # resumed with Range
    assert not (tmp_path / "g.bin.part").exists()

    with pytest.raises(ValueError, match="does not match the expected"):
        download(f"{url}/f.bin", tmp_path / "h.bin", f"sha256:{'0' * 64}", backoff=0)
    assert not list(tmp_path.glob("h.bin*"))  # neither the file nor a .part


def _cifar_tarball(n: int) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
            raw = pickle.dumps(d, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return gzip.compress(head + arr.astype(np.uint8).tobytes())


def test_prepare_each_format_from_a_mirror(server, tmp_path, monkeypatch):
    url, h = server
    monkeypatch.setattr(prep, "HELD_OUT", 4)
    # CIFAR-10 python tarball (pickled numpy batches), known checksum swapped for the fake's
    tarball = _cifar_tarball(10)
    h.files["cifar-10-python.tar.gz"] = tarball
    h.cut.add("cifar-10-python.tar.gz")
    md5 = hashlib.md5(tarball).hexdigest()
    monkeypatch.setitem(prep.SOURCES, "cifar10", [prep.Remote("cifar-10-python.tar.gz", "", f"md5:{md5}")])
    monkeypatch.setattr(prep, "CIFAR10_MD5", {md5: "python"})
    meta = prep.prepare("cifar10", data_dir=tmp_path, mirror=url)
    assert meta["shape"] == [32, 32, 3] and meta["examples"] == {"train": 46, "val": 4, "test": 10}
    ds = load_dataset("cifar10", data_dir=tmp_path)
    with tarfile.open(tmp_path / "downloads" / "cifar10" / "cifar-10-python.tar.gz") as tar:
        first = pickle.loads(tar.extractfile("cifar-10-batches-py/data_batch_1").read())[b"data"][0]
    # raster order: row, column, channel (the batches are channel-planar)
    assert (ds.split("train")[:3072].reshape(32, 32, 3) == first.reshape(3, 32, 32).transpose(1, 2, 0)).all()

    # Fashion-MNIST idx .gz files
    imgs = np.random.default_rng(2).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    files = {"train-images-idx3-ubyte.gz": _idx(imgs), "train-labels-idx1-ubyte.gz": _idx(np.arange(20)),
             "t10k-images-idx3-ubyte.gz": _idx(imgs[:6]), "t10k-labels-idx1-ubyte.gz": _idx(np.arange(6))}
    h.files.update(files)
    sums = {k: _sha(v) for k, v in files.items()}
    monkeypatch.setattr(prep, "FASHION_MNIST_SHA256", sums)
    monkeypatch.setitem(prep.SOURCES, "fashion-mnist", [prep.Remote(k, "", f"sha256:{v}") for k, v in sums.items()])
    meta = prep.prepare("fashion-mnist", data_dir=tmp_path, mirror=url)
    assert meta["examples"] == {"train": 16, "val": 4, "test": 6}

    # enwik-like XML in a zip; the content checksum is the one verified
    xml = b"<mediawiki><page><title>A</title><text>" + b"words and [[links]] " * 500 + b"</text></page></mediawiki>\n"
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", xml)
    h.files["enwik8.zip"] = zbuf.getvalue()
    monkeypatch.setattr(prep, "ENWIK8_SHA256", _sha(xml))
    meta = prep.prepare("enwik8", data_dir=tmp_path, mirror=url)
    n = len(xml)
    assert meta["splits"] == {"train": int(n * 0.9), "val": int(n * 0.95) - int(n * 0.9), "test": n - int(n * 0.95)}
    ds = load_dataset("enwik8", data_dir=tmp_path)
    assert bytes(np.concatenate([ds.split("train"), ds.split("val"), ds.split("test")])) == xml

    # ImageNet 64x64 npz files inside zips, as image-net.org ships them
    def npz_zip(member: str, n: int) -> bytes:
        arr = io.BytesIO()
        np.savez(arr, data=np.random.default_rng(n).integers(0, 256, (n, 12288), dtype=np.uint8), labels=np.arange(n))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            z.writestr(member, arr.getvalue())
        return out.getvalue()

    h.files.update({"Imagenet64_train_part1_npz.zip": npz_zip("train_data_batch_1.npz", 3),
                    "Imagenet64_train_part2_npz.zip": npz_zip("train_data_batch_6.npz", 2),
                    "Imagenet64_val_npz.zip": npz_zip("val_data.npz", 2)})
    with pytest.raises(ValueError, match="an account is needed"):
        prep.prepare("imagenet64", data_dir=tmp_path)  # no canonical URL without a mirror
    meta = prep.prepare("imagenet64", data_dir=tmp_path, mirror=url)
    assert meta["shape"] == [64, 64, 3] and meta["examples"] == {"train": 5, "val": 2}


@pytest.mark.slow
def test_cli_checksum_mismatch_from_mirror_leaves_nothing(server, tmp_path):
    url, h = server
    h.files["input.txt"] = b"not shakespeare " * 1000
    r = subprocess.run([sys.executable, "-m", "sparse_transformer", "data", "prepare", "shakespeare", "--dir",
                        str(tmp_path), "--mirror", url], capture_output=True, text=True)
    assert r.returncode == 2 and "does not match the expected" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "shakespeare").exists()
    assert not list((tmp_path / "downloads").rglob("input.txt*"))


@pytest.mark.slow
def test_offline_message_names_the_file_and_from(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sparse_transformer", "data", "prepare", "shakespeare", "--dir",
                        str(tmp_path), "--mirror", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "SPARSE_TRANSFORMER_DOWNLOAD_RETRIES": "1"})
    assert r.returncode == 2 and "input.txt" in r.stderr and "--from" in r.stderr, r.stderr
