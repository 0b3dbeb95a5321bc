import gzip
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sparse_transformer.data import get_batch, load_dataset
from sparse_transformer.data.prepare import prepare


def test_prepare_shakespeare_real(data_dir, tmp_path):
    meta = prepare("shakespeare", data_dir / "tinyshakespeare.txt", tmp_path)
    assert meta["splits"] == {"train": 1003854, "val": 111540}
    ds = load_dataset("shakespeare", data_dir=tmp_path)
    raw = (data_dir / "tinyshakespeare.txt").read_bytes()
    assert bytes(ds.split("train")[:100]) == raw[:100]
    assert bytes(ds.split("val")[-100:]) == raw[-100:]
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


def test_prepare_fashion_mnist_real(data_dir, tmp_path):
    meta = prepare("fashion-mnist", data_dir / "fashion-mnist", tmp_path)
    assert meta["shape"] == [28, 28, 1] and meta["examples"] == {"train": 58000, "val": 2000, "test": 10000}
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert ds.modality == "image" and ds.shape == [28, 28, 1]
    assert len(ds.split("test")) == 10000 * 784
    x = get_batch(ds.split("val"), 784, seed=0, step=0, global_batch=4, whole_examples=784)
    assert x.shape == (4, 784) and x.max() <= 255


def test_checksum_mismatch_leaves_nothing(data_dir, tmp_path):
    src = tmp_path / "fm"
    shutil.copytree(data_dir / "fashion-mnist", src)
    with open(src / "t10k-images-idx3-ubyte.gz", "ab") as f:
        f.write(b"x")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="does not match the known"):
        prepare("fashion-mnist", src, out)
    assert not (out / "fashion-mnist").exists()
    assert not out.exists() or not any(out.iterdir())  # no half-written folder or temporary file


def test_truncated_idx_is_an_error(tmp_path):
    from sparse_transformer.data.prepare import _read_idx

    f = tmp_path / "x-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100))
    with pytest.raises(ValueError, match="truncated idx file"):
        _read_idx(f)
    f.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a readable idx file"):
        _read_idx(f)


def test_text_prepare_and_no_overwrite(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"hello world " * 100)
    (src / "b.txt").write_bytes(b"second file " * 100)
    meta = prepare("text", src, tmp_path / "data")
    assert meta["splits"]["train"] + meta["splits"]["val"] == 2400
    before = (tmp_path / "data" / "text" / "train.bin").read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        prepare("text", src / "a.txt", tmp_path / "data")
    assert (tmp_path / "data" / "text" / "train.bin").read_bytes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        prepare("text", empty, tmp_path / "other")


def test_batches_are_a_pure_function_of_seed_and_step():
    data = np.arange(10000, dtype=np.uint8)
    a = get_batch(data, 64, seed=3, step=7, global_batch=8)
    b = get_batch(data, 64, seed=3, step=7, global_batch=8)
    assert (a == b).all()
    # two ranks see the two halves of the same global batch
    r0 = get_batch(data, 64, seed=3, step=7, global_batch=8, rank=0, world=2)
    r1 = get_batch(data, 64, seed=3, step=7, global_batch=8, rank=1, world=2)
    assert (np.concatenate([r0, r1]) == a.numpy()).all()
    assert not (get_batch(data, 64, seed=3, step=8, global_batch=8) == a).all()


def test_cli_data_prepare_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sparse_transformer", "data", "prepare", "cifar100", "--dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown dataset 'cifar100'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "sparse_transformer", "data", "prepare", "shakespeare", "--dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "pass --from PATH" in r.stderr
