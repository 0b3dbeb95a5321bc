"""Bad settings are refused with the allowed range named (issue 17, defects 1 and 8)."""
import re

import pytest

from sparse_transformer.train.config import build_config

from helpers import run_cli, tiny
from sparse_transformer.train.loop import train


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("train.grad_clip", "-1", "train.grad_clip must be a finite number in (0, 1e+09]"),
        ("train.grad_clip", "0", "train.grad_clip must be a finite number in (0"),
        ("train.grad_clip", "nan", "train.grad_clip must be a finite number"),
        ("train.min_lr_ratio", "-1", "train.min_lr_ratio must be a finite number in [0, 1]"),
        ("train.lr", "inf", "train.lr must be a finite number in (0, 10]"),
        ("train.weight_decay", "nan", "train.weight_decay must be a finite number in [0, 10]"),
        ("train.beta1", "1", "train.beta1 must be a finite number in [0, 1)"),
        ("train.beta2", "-0.5", "train.beta2 must be a finite number in [0, 1)"),
        ("train.time_limit", "nan", "train.time_limit must be a finite number in [0"),
        ("train.time_limit", "inf", "train.time_limit must be a finite number in [0"),
        ("train.ema", "1", "train.ema must be a finite number in [0, 1)"),
        ("model.ff_mult", "inf", "model.ff_mult must be a number in (0, 64]"),
        ("model.ff_mult", "nan", "model.ff_mult must be a number in (0, 64]"),
        ("train.batch_size", "0", "train.batch_size must be an integer >= 1"),
    ],
)
def test_bad_numeric_settings_are_refused(key, value, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        build_config(None, None, [(key, value)]).validate()


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_eval_batch_size_must_be_positive(tmp_path, value):
    train(tiny(tmp_path, steps=1), show_progress=False, echo=lambda *_: None)
    r = run_cli("eval", str(tmp_path), "--batch-size", value, "--max-bytes", "500")
    assert r.returncode == 2
    assert "--batch-size: expected an integer >= 1" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "eval-val.json").exists()


@pytest.mark.slow
def test_sample_temperature_must_be_finite(tmp_path):
    r = run_cli("sample", str(tmp_path), "--temperature", "nan")
    assert r.returncode == 2 and "expected a finite number >= 0" in r.stderr and "Traceback" not in r.stderr


def test_second_run_on_a_locked_folder_fails_naming_the_holder(tmp_path):
    import os

    from sparse_transformer.train.guard import RunLock

    with RunLock(tmp_path):
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            train(tiny(tmp_path, steps=1), show_progress=False, echo=lambda *_: None)
    assert not (tmp_path / "ckpt.pt").exists()


def test_non_finite_loss_is_skipped_then_stops_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    import torch

    import sparse_transformer.model.model as model_module
    from sparse_transformer.train.guard import Diverged

    calls = {"n": 0}
    real = model_module.nll

    def poisoned(*a, **k):  # the training loss turns NaN from the 5th step on
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] > 4 else out

    monkeypatch.setattr(model_module, "nll", poisoned)
    with pytest.raises(Diverged, match="3 steps in a row"):
        train(tiny(tmp_path, ("train.ckpt_every", "4"), ("train.max_nonfinite", "3"), steps=20),
              show_progress=False, echo=lambda *_: None)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    import json

    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert any(r.get("loss", 0) is None for r in rows)


def test_sigterm_saves_and_stops_with_exit_code_0(tmp_path, monkeypatch):
    import os
    import signal

    import torch

    import sparse_transformer.train.trainer as trainer
    from sparse_transformer.train.guard import Stopped

    real = trainer.get_batch

    def batch_then_term(data, n_ctx, seed, step, *a, **k):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(data, n_ctx, seed, step, *a, **k)

    monkeypatch.setattr(trainer, "get_batch", batch_then_term)
    with pytest.raises(Stopped) as e:
        train(tiny(tmp_path, steps=50), show_progress=False, echo=lambda *_: None)
    assert e.value.code == 0
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3  # the current step finished
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_torn_metrics_line_is_dropped_on_resume_and_finished_run_is_left_alone(tmp_path):
    train(tiny(tmp_path, ("train.ckpt_every", "2"), ("train.stop_at", "2"), steps=4),
          show_progress=False, echo=lambda *_: None)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # torn by a full disk
    train(tiny(tmp_path, steps=4), resume=True, show_progress=False, echo=lambda *_: None)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"}
    said = []
    train(tiny(tmp_path, steps=4), resume=True, show_progress=False, echo=said.append)
    assert any("nothing to do" in s for s in said)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before


def test_fresh_run_refuses_a_folder_with_another_runs_log(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="holds another run's log"):
        train(tiny(tmp_path, steps=1), show_progress=False, echo=lambda *_: None)


def _no_space(path, *a, **k):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_exit_2_and_leaves_the_old_files(monkeypatch, capsys, tmp_path):
    import sparse_transformer.data.prepare as prep
    import sparse_transformer.train.trainer as trainer
    from helpers import TINY
    from sparse_transformer import cli

    out = tmp_path / "run"
    args = ["train", *[f"--{k}={v}" for k, v in TINY], "--train.steps=2", f"--train.out_dir={out}", "--no-progress"]
    assert cli.main(args) == 0
    before = (out / "ckpt.pt").read_bytes()
    monkeypatch.setattr(trainer, "atomic_torch_save", lambda obj, path: _no_space(path))
    capsys.readouterr()
    assert cli.main(args[:-2] + ["--train.steps=4", f"--train.out_dir={out}", "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device writing" in err[0] and "ckpt.pt" in err[0], err
    assert (out / "ckpt.pt").read_bytes() == before
    (tmp_path / "corpus.txt").write_bytes(b"some text to prepare " * 50)
    monkeypatch.setattr(prep, "atomic_open", _no_space)
    assert cli.main(["data", "prepare", "text", "--from", str(tmp_path / "corpus.txt"), "--dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("reading ") and len(err) == 2 and "no space left on the device" in err[1], err
    assert not (tmp_path / "d" / "text").exists() and not list((tmp_path / "d").glob(".text.*"))


@pytest.mark.parametrize("text,msg", [("model = [\n", "not valid TOML"), ('[model]\nn_layer = "x"\n', "model.n_layer expects int"),
                                      ("[model]\nnope = 1\n", "unknown setting 'model.nope'")])
def test_errors_in_a_toml_file_name_the_file(tmp_path, text, msg):
    f = tmp_path / "my.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=f"^{str(f)}: .*{msg}".replace(".", r"\.").replace(r"\.\*", ".*")):
        build_config(None, str(f), [])
