"""Patterns defined in this file alone (a registered subclass and a named Custom) work everywhere:
attention fwd+bwd on the fused kernel, the model config, training, decoding and pictures. Nothing in
the package names them."""
from dataclasses import dataclass

import pytest
import torch

import sparse_transformer as sp
from sparse_transformer import patterns as P
from sparse_transformer.patterns import Pattern, register

from helpers import tiny


@register("every_third", "window")
@dataclass(frozen=True)
class EveryThird(Pattern):
    """A window plus every third position."""

    window: int

    def allowed(self, i, j):
        d = i - j
        return (d >= 0) & ((d < self.window) | (j % 3 == 0))


CUSTOM = P.Custom(lambda i, j: (i - j < 5) | (j < 2) | ((j // 8) % 4 == 1), block=8, name="test_custom")


@pytest.mark.parametrize("spec", ["every_third:6", "test_custom"])
def test_attention_on_the_kernel_equals_the_reference(spec):
    pattern = P.parse(spec)
    assert P.spec(pattern) == spec
    assert torch.equal(pattern.tiles(77, 16).coverage(), pattern.mask(77).int())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 77, 16, generator=g, requires_grad=True) for _ in range(3))
    got = sp.attention(q, k, v, pattern, backend="native")
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = sp.attention(*exact, pattern, backend="reference")
    assert torch.allclose(got.double(), want, atol=1e-5)
    ga = torch.autograd.grad(got.sum(), (q, k, v))
    gw = torch.autograd.grad(want.sum(), exact)
    assert all(torch.allclose(a.double(), b, atol=1e-5) for a, b in zip(ga, gw))


def test_causality_is_always_added():
    anything = P.Custom(lambda i, j: torch.ones_like(i - j, dtype=torch.bool))
    assert torch.equal(anything.mask(9), torch.ones(9, 9, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="bool tensor"):
        P.Custom(lambda i, j: i - j).mask(4)
    with pytest.raises(ValueError, match="callable"):
        P.Custom(3)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["every_third:6", "test_custom"])
def test_trains_samples_and_draws(tmp_path, spec):
    from sparse_transformer.pictures import pattern_image
    from sparse_transformer.train.loop import train

    summary = train(tiny(tmp_path / "run", ("model.pattern", spec), steps=3), show_progress=False,
                    echo=lambda *_: None)
    assert summary["steps"] == 3
    img = pattern_image(P.parse(spec), 24)
    assert img.ndim == 3 and img.shape[-1] == 3


def test_the_cli_imports_a_file_that_registers_a_pattern(tmp_path):
    """``sparse-transformer --import FILE``: a pattern registered in the user's own file is a spec for
    every command (here ``show-pattern`` and ``bench attention``); a missing file or a failing module is
    one line, exit code 2."""
    from helpers import assert_one_line_error, run_cli

    mine = tmp_path / "my_patterns.py"
    mine.write_text("from sparse_transformer import patterns as P\n"
                    "P.Custom(lambda i, j: (i - j < 4) | (j % 8 == 0), block=8, name='from_my_file')\n")
    r = run_cli("--import", mine, "show-pattern", "from_my_file", "-n", "32", "-o", tmp_path / "p.png")
    assert r.returncode == 0 and (tmp_path / "p.png").stat().st_size > 0, r.stderr
    out = tmp_path / "b.json"
    r = run_cli("--import", mine, "bench", "attention", "--device", "cpu", "--n", "256", "--cases", "from_my_file",
                "--json", out)
    assert r.returncode == 0, r.stderr
    assert "from_my_file" in out.read_text()
    assert_one_line_error(run_cli("show-pattern", "from_my_file"), "unknown pattern 'from_my_file'", "--import FILE")
    assert_one_line_error(run_cli("--import", tmp_path / "nope.py", "show-pattern", "dense"), "no such file")
    (tmp_path / "broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    assert_one_line_error(run_cli("--import", tmp_path / "broken.py", "show-pattern", "dense"), "broken on purpose")
