"""Bad settings are refused with the allowed range named (issue 17, defects 1 and 8)."""
import re

import pytest

from sparse_transformer.train.config import build_config

from test_train import run_cli, tiny, train


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


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_eval_batch_size_must_be_positive(tmp_path, value):
    train(tiny(tmp_path, steps=1), show_progress=False, echo=lambda *_: None)
    r = run_cli("eval", str(tmp_path), "--batch-size", value, "--max-bytes", "500")
    assert r.returncode == 2
    assert "--batch-size: expected an integer >= 1" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "eval-val.json").exists()


def test_sample_temperature_must_be_finite(tmp_path):
    r = run_cli("sample", str(tmp_path), "--temperature", "nan")
    assert r.returncode == 2 and "expected a finite number >= 0" in r.stderr and "Traceback" not in r.stderr
