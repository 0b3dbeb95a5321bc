"""Dynamic evaluation: each window is scored before the model learns from it, the model passed in is left
as it was, and what is learnt while reading carries over to later windows."""
import math

import numpy as np
import pytest
import torch

from sparse_transformer.model import ModelConfig, SparseTransformer
from sparse_transformer.train.config import build_config
from sparse_transformer.train.evaluate import evaluate, evaluate_dynamic


def small_model(seed: int = 0) -> SparseTransformer:
    torch.manual_seed(seed)
    return SparseTransformer(ModelConfig(n_ctx=64, d_model=32, n_layer=2, n_head=2, pattern="strided", stride=8,
                                         dropout=0.1))


def test_the_first_window_is_scored_before_any_step_and_the_model_is_left_unchanged():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = np.random.default_rng(0).integers(0, 256, 640, dtype=np.uint8)
    first = evaluate_dynamic(model, data, lr=0.5, max_bytes=64)["bits_per_dim"]
    assert math.isclose(first, evaluate(model, data, max_bytes=64)["bits_per_dim"], rel_tol=1e-6)
    res = evaluate_dynamic(model, data, lr=0.5)
    assert res["bytes"] == 640 and res["dynamic_lr"] == 0.5
    assert res["bits_per_dim"] != evaluate(model, data)["bits_per_dim"]  # later windows were read by another model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # its mode too


def test_what_is_read_helps_later_windows_that_repeat_it():
    """128 random bytes, repeated: windows of 64 bytes never see the repeat in their context, so only
    the adaptation can learn it (like bzip2, which would code the repeats in almost nothing)."""
    model = small_model()
    model.eval()
    data = np.tile(np.random.default_rng(1).integers(0, 256, 128, dtype=np.uint8), 12)
    static = evaluate(model, data)["bits_per_dim"]
    dynamic = evaluate_dynamic(model, data, lr=1.0)["bits_per_dim"]
    assert dynamic < static - 1.0, (static, dynamic)  # 8.0 against 6.6 (6.6-6.65 for three seeds)


def test_a_window_shorter_than_the_context_is_scored_and_bad_settings_are_errors():
    model = small_model()
    data = np.random.default_rng(2).integers(0, 256, 100, dtype=np.uint8)
    assert evaluate_dynamic(model, data, lr=0.1)["bytes"] == 100
    with pytest.raises(ValueError, match="must be > 0"):
        evaluate_dynamic(model, data, lr=0.0)
    with pytest.raises(ValueError, match="empty split"):
        evaluate_dynamic(model, data[:0], lr=0.1)
    with pytest.raises(ValueError, match=r"train.dynamic_eval_lr must be a finite number in \[0, 10\]"):
        build_config(None, None, [("train.dynamic_eval_lr", "-1")]).validate()
