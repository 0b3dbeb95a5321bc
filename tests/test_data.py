import gzip
import json
import shutil

import numpy as np
import pytest

from helpers import assert_one_line_error, cli_here, run_cli
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
    with pytest.raises(ValueError, match="does not match the expected"):
        prepare("fashion-mnist", src, out)
    assert not (out / "fashion-mnist").exists()
    assert not out.exists() or not any(out.iterdir())  # no half-written folder or temporary file


def test_truncated_idx_is_an_error(tmp_path):
    from sparse_transformer.data.formats import read_idx as _read_idx

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


@pytest.mark.slow
def test_cli_data_prepare_errors(tmp_path):
    assert_one_line_error(cli_here("data", "prepare", "cifar100", "--dir", tmp_path), "unknown dataset 'cifar100'")
    r = cli_here("data", "prepare", "shakespeare", "--dir", tmp_path)
    assert r.returncode == 2 and "pass --from PATH" in r.stderr


def test_audio_real_round_trip(data_dir, tmp_path):
    pytest.importorskip("soundfile")
    from sparse_transformer.data import formats

    src = data_dir / "brahms-hungarian-dance-5.ogg"
    meta = prepare("audio", src, tmp_path)
    n = meta["splits"]["train"] + meta["splits"]["val"]
    assert meta["modality"] == "audio" and meta["sample_rate"] == 12000
    assert abs(n - 45.84 * 12000) < 0.01 * n  # 45.8 s at 12 kHz
    ds = load_dataset("audio", data_dir=tmp_path)
    codes = np.asarray(ds.split("train"))
    assert len(np.unique(codes)) > 100  # a real recording uses most of the 256 levels
    # mu-law: decoding then encoding gives back every code
    assert (formats.mu_law_encode(formats.mu_law_decode(np.arange(256))) == np.arange(256)).all()
    wav = tmp_path / "x.wav"
    formats.write_wav(wav, codes[:12000])
    back = formats.read_audio(wav)  # 16-bit PCM at 12 kHz: no resampling on the way back
    assert len(back) == 12000
    assert (formats.mu_law_encode(back) == codes[:12000]).mean() > 0.99


def test_images_folder_and_bad_inputs(tmp_path):
    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    pix = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(10)]
    for i, p in enumerate(pix):
        Image.fromarray(p).save(src / f"{i}.png")
    meta = prepare("images", src, tmp_path / "data", size=(6, 5))
    assert meta["shape"] == [6, 5, 3] and meta["examples"] == {"train": 9, "val": 1}
    ds = load_dataset("images", data_dir=tmp_path / "data")
    first = ds.split("train")[:90].reshape(6, 5, 3)
    assert any((first == p).all() for p in pix)  # row, column, channel order
    Image.fromarray(pix[0][:4]).save(src / "small.png")
    with pytest.raises(ValueError, match="small.png: the image is 4x5, expected 6x5"):
        prepare("images", src, tmp_path / "other", size=(6, 5))
    assert not (tmp_path / "other" / "images").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no PNG or JPEG files"):
        prepare("images", empty, tmp_path / "other")


def _cli(*args):
    return cli_here(*args)


def _class_folders(root, sizes=((6, 5), (8, 7), (6, 5), (9, 9)), per_class=5):
    """Images in class subfolders a/, b/, ... of mixed sizes."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for k, (h, w) in enumerate(sizes):
        folder = root / "abcdefgh"[k]
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_images_name_resize_test_split_labels_note_and_small_meta(tmp_path):
    src = _class_folders(tmp_path / "src")
    said = []
    meta = prepare("images", src, tmp_path / "data", 0.7, size=(4, 4), resize=True, out_name="mine",
                   test_fraction=0.2, progress=said.append)
    assert meta["name"] == "mine" and meta["shape"] == [4, 4, 3]
    assert meta["examples"] == {"train": 14, "val": 2, "test": 4}
    assert any("labels are not used" in m for m in said)
    text = (tmp_path / "data" / "mine" / "meta.json").read_text()
    assert str(src) not in text and "0.png" not in text and meta["sources"][0]["files"] == 20
    ds = load_dataset("mine", data_dir=tmp_path / "data")
    assert sorted(ds.splits) == ["test", "train", "val"] and ds.shape == [4, 4, 3]
    # a second folder of the same kind under another name; the first is left alone
    prepare("images", src, tmp_path / "data", size=(4, 4), resize=True, out_name="again")
    assert (tmp_path / "data" / "mine" / "meta.json").read_text() == text
    with pytest.raises(ValueError, match="the image is 8x7, expected 6x5"):  # no --resize: sizes must agree
        prepare("images", src, tmp_path / "data", size=(6, 5), out_name="strict")


@pytest.mark.slow
def test_cli_name_resize_test_fraction_and_print_config(tmp_path):
    src = _class_folders(tmp_path / "src")
    r = run_cli("data", "prepare", "images", "--from", src, "--dir", tmp_path / "data", "--resize", "4x4",
                "--name", "tiny4", "--fraction", "0.7", "--test-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    assert "prepared images in" in r.stdout and "tiny4" in r.stdout and "labels are not used" in r.stderr
    r = cli_here("train", "--data.name", tmp_path / "data" / "tiny4", "--print-config")
    cfg = json.loads(r.stdout)
    assert cfg["model"]["data_shape"] == [4, 4, 3] and cfg["model"]["n_ctx"] == 48 and cfg["model"]["stride"] == 12
    for args, msg in [(("--name", "x/y"), "plain folder name"), (("--test-fraction", "0.5"), "test fraction must be in"),
                      (("--size", "4x4", "--resize", "4x4"), "not both")]:
        r = cli_here("data", "prepare", "images", "--from", src, "--dir", tmp_path / "data", *args)
        assert_one_line_error(r, msg)
    r = cli_here("data", "prepare", "shakespeare", "--name", "s", "--dir", tmp_path / "data")
    assert_one_line_error(r, "are for text, images, audio")


@pytest.mark.slow
def test_cli_bad_inputs_one_line_and_nothing_damaged(tmp_path):
    data = tmp_path / "data"
    (tmp_path / "t.txt").write_bytes(b"some text " * 50)
    assert _cli("data", "prepare", "text", "--from", str(tmp_path / "t.txt"), "--dir", str(data)).returncode == 0
    before = {p.name: p.read_bytes() for p in (data / "text").iterdir()}
    bad_tar = tmp_path / "cifar-10-python.tar.gz"
    bad_tar.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    noise = tmp_path / "noise.wav"
    noise.write_bytes(b"RIFF" + b"\0" * 40)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (("cifar10", "--from", str(bad_tar)), "neither CIFAR-10"),
        (("audio", "--from", str(noise)), "cannot decode audio"),
        (("audio", "--from", str(empty)), "holds no WAV/FLAC/OGG files"),
        (("text", "--from", str(tmp_path / "t.txt")), "already exists"),
        (("text", "--from", str(tmp_path / "t.txt"), "--dir", str(tmp_path / "t.txt" / "sub")), "cannot write into"),
    ]
    for args, msg in cases:
        r = _cli("data", "prepare", *args, *(() if "--dir" in args else ("--dir", str(data))))
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 3
    assert {p.name: p.read_bytes() for p in (data / "text").iterdir()} == before
    assert sorted(p.name for p in data.iterdir()) == ["text"]  # no half-prepared dataset beside it


def test_cli_data_dir_without_permission(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("running as root: permissions are not enforced")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    (tmp_path / "t.txt").write_bytes(b"some text " * 50)
    r = _cli("data", "prepare", "text", "--from", str(tmp_path / "t.txt"), "--dir", str(locked))
    locked.chmod(0o700)
    assert r.returncode == 2 and "permission denied" in r.stderr
