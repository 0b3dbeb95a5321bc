"""One loader for every command (``load_run``), the memory check before a model is built, and
one-line errors for anything that is not a run."""
import copy
import os
import pickle

import pytest
import torch

from helpers import assert_one_line_error, cli_here, run_cli, tiny
from sparse_transformer.model import SparseTransformer
from sparse_transformer.model.config import ModelConfig
from sparse_transformer.train import memory
from sparse_transformer.train.checkpoint import load_run
from sparse_transformer.train.loop import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(tiny(out, ("train.ema", "0.9"), steps=3), show_progress=False, echo=lambda *_: None)
    return out


def test_load_run_takes_a_folder_its_checkpoint_or_its_safetensors(run_dir):
    runs = [load_run(p) for p in (run_dir, run_dir / "ckpt.pt", run_dir / "model.safetensors")]
    for r in runs:
        assert r.modality == "text" and r.step == 3 and not r.model.training
        assert r.config.to_dict() == runs[0].config.to_dict()
    ema = torch.load(run_dir / "ckpt.pt", weights_only=True)["eval_weights"] == "ema"
    assert runs[0].ema == runs[2].ema == ema
    for a, b in zip(runs[0].model.state_dict().values(), runs[2].model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_sample_and_eval_accept_the_exported_weights(run_dir, tmp_path):
    r = run_cli("sample", run_dir / "model.safetensors", "--length", "8", "--no-progress", "-o", tmp_path / "s.txt")
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", run_dir / "model.safetensors", "--max-bytes", "500", "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr


def _bad_files(run_dir, tmp_path):
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"model": 1, "config": {}}))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save({**ckpt, "config": "model.n_layer = 2"}, tmp_path / "string-config.pt")
    wrong = {**ckpt, "ema": {}, "model": {**ckpt["model"], "head.weight": torch.zeros(3, 3)}}
    torch.save(wrong, tmp_path / "wrong-shapes.pt")
    huge = copy.deepcopy(ckpt["config"])
    huge["model"]["n_layer"] = 10**7
    torch.save({**ckpt, "config": huge}, tmp_path / "huge.pt")
    (tmp_path / "empty").mkdir()
    return {
        "random.pt": "not a sparse-transformer checkpoint",
        "pickle.pt": "not a sparse-transformer checkpoint",
        "foreign.pt": "not a sparse-transformer checkpoint",
        "string-config.pt": "its config is a str",
        "wrong-shapes.pt": "the weights do not match its config",
        "huge.pt": "GiB available",
        "empty": "holds neither ckpt.pt nor model.safetensors",
    }


@pytest.mark.slow
def test_what_is_not_a_run_is_one_line(run_dir, tmp_path):
    bad = _bad_files(run_dir, tmp_path)
    for name, msg in bad.items():
        with pytest.raises(ValueError, match=msg):
            load_run(tmp_path / name)
        assert_one_line_error(cli_here("eval", tmp_path / name, "--json=-"), msg, name)
    for name in ("pickle.pt", "wrong-shapes.pt"):  # sample goes through the same loader
        assert_one_line_error(cli_here("sample", tmp_path / name, "--no-progress"), bad[name], name)
    # and once through the real entry point, in a fresh interpreter
    assert_one_line_error(run_cli("eval", tmp_path / "pickle.pt"), bad["pickle.pt"], "pickle.pt")


@pytest.mark.parametrize("model", [
    ModelConfig(n_ctx=64, d_model=32, n_layer=3, n_head=2, stride=8),
    ModelConfig(n_ctx=48, d_model=48, n_layer=2, n_head=4, stride=4, c=2, data_shape=[4, 4, 3], qk_ratio=0.5,
                ff_mult=2.0),
    ModelConfig(n_ctx=64, d_model=32, n_layer=5, n_head=2, stride=8, rotary=True, combine="multihead"),
])
def test_param_count_is_exact(model):
    assert memory.param_count(model) == sum(p.numel() for p in SparseTransformer(model).parameters())


@pytest.mark.slow
def test_a_model_that_cannot_fit_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    r = run_cli("train", "--model.n_layer", "1000000", "--train.out_dir", tmp_path / "big", timeout=60)
    assert_one_line_error(r, "needs about", "GiB available", "--force")
    assert not (tmp_path / "big").exists()
    cfg = tiny(tmp_path / "small")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match="needs about"):
        train(cfg, show_progress=False, echo=lambda *_: None)
    train(cfg, show_progress=False, echo=lambda *_: None, force=True)  # --force: the check is skipped
    assert (tmp_path / "small" / "ckpt.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("damage,msg", [
    (lambda d: (d / "val.bin").write_bytes((d / "val.bin").read_bytes()[:1000]), "holds 1,000 bytes but"),
    (lambda d: (d / "meta.json").write_text("null"), "must hold a JSON object, got NoneType"),
    (lambda d: (d / "meta.json").write_text("{"), "is not valid JSON"),
    (lambda d: (d / "meta.json").write_text('{"splits": {"train": -1}}'), "'splits' must map split names"),
    (lambda d: (d / "meta.json").write_text('{"splits": {"train": 10}, "modality": "video"}'), "'modality' must be one of"),
])
def test_prepared_data_is_checked_against_meta_json(tmp_path, damage, msg):
    from helpers import tiny_images
    from sparse_transformer.data import load_dataset

    data = tiny_images(tmp_path, shape=(8, 8, 3), counts=(("train", 40), ("val", 20)))
    damage(data)
    with pytest.raises(ValueError, match=msg):
        load_dataset(str(data))
    r = run_cli("train", "--data.name", data, "--train.out_dir", tmp_path / "run", "--train.steps", "1", timeout=120)
    assert_one_line_error(r, msg)
    assert not (tmp_path / "run").exists()
