import json

import pytest
import torch

from helpers import TINY, cli_here, losses, run_cli, tiny
from sparse_transformer.train.config import build_config
from sparse_transformer.train.loop import train


def test_train_writes_everything(tmp_path):
    summary = train(tiny(tmp_path), show_progress=False, echo=lambda *_: None)
    for name in ("ckpt.pt", "metrics.jsonl", "model.safetensors", "config.json", "summary.json"):
        assert (tmp_path / name).is_file(), name
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and set(ckpt) >= {"model", "optimizer", "rng", "config", "scaler", "ema"}
    # the head starts at zero: an untrained model scores exactly 8 bits per byte (uniform); 6 steps learn the byte frequencies
    assert 0 < summary["val_bits_per_dim"] < 7.5
    assert len(summary["sample"]) > 0
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "model.safetensors")
    assert torch.equal(weights["head.weight"], ckpt["model"]["head.weight"])


def test_resume_gives_identical_losses(tmp_path):
    full = tmp_path / "full"
    train(tiny(full, ("train.ckpt_every", "3")), show_progress=False, echo=lambda *_: None)
    # A run killed right after writing its step-3 checkpoint, then resumed.
    first = tmp_path / "first"
    c = tiny(first, ("train.ckpt_every", "3"))
    c.train.steps = 6
    import sparse_transformer.train.trainer as loop

    class Stop(Exception):
        pass

    real = loop.atomic_torch_save

    def save_then_die(obj, path):
        real(obj, path)
        if obj["step"] == 3:
            raise Stop

    loop.atomic_torch_save = save_then_die
    try:
        with pytest.raises(Stop):
            train(c, show_progress=False, echo=lambda *_: None)
    finally:
        loop.atomic_torch_save = real
    assert torch.load(first / "ckpt.pt", weights_only=True)["step"] == 3
    train(c, resume=True, show_progress=False, echo=lambda *_: None)
    a, b = losses(full), losses(first)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[s] == b[s] for s in a), (a, b)


def test_time_schedule_decays_with_the_clock():
    from sparse_transformer.train.optim import lr_at

    c = build_config(None, None, [("train.steps", "1000"), ("train.warmup", "10"), ("train.lr", "1e-3"),
                                  ("train.min_lr_ratio", "0.1"), ("train.time_limit", "100"), ("train.schedule", "time")])
    assert lr_at(4, c.train, elapsed=99.0) == pytest.approx(5e-4)  # warmup goes by steps
    assert lr_at(20, c.train, elapsed=50.0) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half the time: half the cosine
    assert lr_at(20, c.train, elapsed=100.0) == pytest.approx(1e-4)  # time is up: the floor
    assert lr_at(1000, c.train, elapsed=0.0) == pytest.approx(1e-4)  # the step count still ends it
    c.train.schedule = "steps"
    assert lr_at(20, c.train, elapsed=100.0) > 9.9e-4  # the clock is ignored


def test_time_limit_spans_resumes(tmp_path):
    c = tiny(tmp_path, ("train.time_limit", "1e6"), ("train.schedule", "time"), steps=4)
    train(c, show_progress=False, echo=lambda *_: None)
    spent = torch.load(tmp_path / "ckpt.pt", weights_only=True)["train_seconds"]
    assert spent > 0
    c.train.steps, c.train.time_limit = 8, spent  # the budget is already used up: one more step, then stop
    said = []
    summary = train(c, resume=True, show_progress=False, echo=said.append)
    assert summary["steps"] == 5
    assert any("time limit" in m for m in said)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["train_seconds"] > spent


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    train(tiny(tmp_path), show_progress=False, echo=lambda *_: None)
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match="already exists; pass --resume"):
        train(tiny(tmp_path), show_progress=False, echo=lambda *_: None)
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_bfloat16_and_ema_and_recompute(tmp_path):
    cfg = tiny(tmp_path, ("train.precision", "bfloat16"), ("train.ema", "0.9"), ("model.recompute", "true"), steps=3)
    summary = train(cfg, show_progress=False, echo=lambda *_: None)
    assert summary["val_bits_per_dim"] < 7.9  # below the 8 bits of the untrained (uniform) model


def test_ema_is_the_polyak_average():
    from sparse_transformer.train.optim import EMA

    lin = torch.nn.Linear(3, 2)
    w0 = lin.weight.detach().clone()
    ema = EMA(lin, 0.9)
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    ema.update(lin)
    # Warm-up of the decay: d_0 = min(0.9, 1/10), d_1 = min(0.9, 2/11); the initial weights keep d_0 * d_1.
    expected = w0 * (0.1 * 2 / 11) + (w0 + 1) * (1 - 0.1 * 2 / 11)
    assert torch.allclose(ema.state_dict()["weight"], expected, atol=1e-6)
    assert ema.decay_at(0) == 0.1 and ema.decay_at(10**6) == 0.9 and ema.updates == 2
    ema.swap(lin)
    assert torch.allclose(lin.weight, expected, atol=1e-6)
    ema.swap(lin)
    assert torch.allclose(lin.weight, w0 + 1)


def test_compiled_training_matches_eager(tmp_path):
    no_dropout = ("model.dropout", "0.0")  # compiled dropout draws other random numbers
    train(tiny(tmp_path / "eager", no_dropout, steps=3), show_progress=False, echo=lambda *_: None)
    train(tiny(tmp_path / "compiled", no_dropout, ("train.compile", "true"), steps=3), show_progress=False,
          echo=lambda *_: None)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() == {1, 2, 3}
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4)


@pytest.mark.slow
def test_cli_train_and_eval(tmp_path):
    args = [f"--{k}={v}" for k, v in TINY] + ["--train.steps=2", f"--train.out_dir={tmp_path}", "--no-progress"]
    r = run_cli("train", *args)
    assert r.returncode == 0, r.stderr
    assert "validation:" in r.stdout
    r = run_cli("eval", str(tmp_path), "--max-bytes", "1000")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "eval-val.json").read_text())
    assert res["bytes"] == 1000 and res["bits_per_dim"] > 0 and res["precision"] == "float32"
    r = run_cli("eval", str(tmp_path), "--max-bytes", "1000", "--precision", "bfloat16", "--json", str(tmp_path / "bf.json"))
    assert r.returncode == 0, r.stderr
    bf = json.loads((tmp_path / "bf.json").read_text())
    assert bf["precision"] == "bfloat16" and abs(bf["bits_per_dim"] - res["bits_per_dim"]) < 0.05
    r = cli_here("eval", str(tmp_path), "--max-bytes", "1000", "--dynamic", "0.2", "--json", str(tmp_path / "dyn.json"))
    assert r.returncode == 0, r.stderr
    assert "dynamic evaluation at 0.2" in r.stdout
    dyn = json.loads((tmp_path / "dyn.json").read_text())
    assert dyn["bytes"] == 1000 and dyn["dynamic_lr"] == 0.2 and dyn["bits_per_dim"] != res["bits_per_dim"]
    for bad in ("-1", "nan"):
        r = cli_here("eval", str(tmp_path), "--dynamic", bad)
        assert r.returncode == 2 and "--dynamic must be a learning rate >= 0" in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--model.n_layers", "8"], "unknown setting 'model.n_layers'; allowed: model.n_ctx"),
        (["train", "--model.n_layer", "eight"], "model.n_layer expects int, got 'eight'"),
        (["train", "--model.pattern", "sparse"], "model.pattern must be one of"),
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--data.name", "/nonexistent/file.txt", "--train.out_dir", "OUT"], "run `sparse-transformer data prepare"),
        (["eval", "/nonexistent/ckpt.pt"], "checkpoint not found"),
        (["bench", "attention", "--cases", "strided:x"], "bad case"),
        (["train", "--train.schedule", "time", "--train.time_limit", "0"], "train.schedule = 'time' needs train.time_limit > 0"),
        (["train", "--train.schedule", "epochs"], "train.schedule must be steps or time"),
    ],
)
@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "o")) for a in args]
    r = cli_here(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_corrupt_checkpoint(tmp_path):
    train(tiny(tmp_path), show_progress=False, echo=lambda *_: None)
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    r = run_cli("eval", str(tmp_path))
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "--resume", f"--train.out_dir={tmp_path}", "--no-progress")
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr
    assert (tmp_path / "ckpt.pt").read_bytes() == data[: len(data) // 2]  # untouched


def test_toml_config(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\nn_layer = 3\n[train]\nlr = 0.01\n')
    cfg = build_config(None, str(f), [("model.d_model", "64")])
    assert cfg.model.n_layer == 3 and cfg.train.lr == 0.01 and cfg.model.d_model == 64
    f.write_text('[model]\nn_layer = "3"\n')
    with pytest.raises(ValueError, match="model.n_layer expects int"):
        build_config(None, str(f), [])
    f.write_text('[optim]\nlr = 1\n')
    with pytest.raises(ValueError, match="unknown section 'optim'"):
        build_config(None, str(f), [])
