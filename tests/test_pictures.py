
import numpy as np
import pytest
from PIL import Image

from sparse_transformer import patterns as P
from sparse_transformer.pictures import ALLOWED, EMPTY, GAP, QUERY, pattern_image
from helpers import cli_here, run_cli, tiny_images
from sparse_transformer.train.config import build_config
from sparse_transformer.train.loop import train


def _matrix(img: np.ndarray, n: int, scale: int, row: int = 0, panel_h: int | None = None) -> np.ndarray:
    """Read the connectivity matrix of panel row ``row`` back out of the picture, one pixel per cell."""
    top = GAP + row * ((panel_h or n * scale) + GAP)
    cells = img[top : top + n * scale : scale, GAP : GAP + n * scale : scale]
    assert ((cells == ALLOWED).all(-1) | (cells == EMPTY).all(-1)).all()
    return (cells == ALLOWED).all(-1)


@pytest.mark.parametrize("pattern", [P.Dense(), P.Local(5), P.Strided(8), P.Fixed(8, 2), P.Strided(7)])
def test_pattern_picture_pixels_equal_the_mask(pattern, tmp_path):
    n, scale = 50, 3
    img = pattern_image(pattern, n, scale=scale, width=8)
    assert (_matrix(img, n, scale) == pattern.mask(n).numpy()).all()
    # the right-hand panel: the last query's row, in rows of 8, with the query in red
    left = GAP + n * scale + GAP
    grid = img[GAP : GAP + 7 * scale : scale, left : left + 8 * scale : scale].reshape(-1, 3)[:n]
    expect = pattern.mask(n).numpy()[n - 1].copy()
    assert (grid[n - 1] == QUERY).all()
    assert ((grid[: n - 1] == ALLOWED).all(-1) == expect[: n - 1]).all()


@pytest.mark.slow
def test_show_pattern_cli_heads_and_factors(tmp_path):
    out = tmp_path / "f.png"
    r = run_cli("show-pattern", "fixed", "--stride", "8", "-c", "2", "-n", "32", "--heads", "4", "--distinct-heads",
                "--factors", "--scale", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(out).convert("RGB"))
    rows = 4 + 2  # four heads, two factors
    assert img.shape == (GAP + rows * (32 * 2 + GAP), GAP + 32 * 2 + GAP + 8 * 2 + GAP, 3)
    pat = P.Fixed(8, 2, distinct_heads=True)
    for h in range(4):
        assert (_matrix(img, 32, 2, row=h) == pat.per_head(4)[h].mask(32).numpy()).all()
    assert (_matrix(img, 32, 2, row=5) == pat.factors()[1].mask(32).numpy()).all()
    r = cli_here("show-pattern", "strided", "--stride", "0", "-o", str(out))
    assert r.returncode == 2 and "stride" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_show_attention_and_plot(tmp_path):
    tiny_images(tmp_path / "data")
    runs = []
    for pattern in ("dense", "strided"):
        run = tmp_path / pattern
        cfg = build_config(None, None, [("model.d_model", "32"), ("model.n_layer", "3"), ("model.n_head", "2"),
                                        ("model.pattern", pattern), ("train.steps", "4"), ("train.batch_size", "2"),
                                        ("train.log_every", "1"), ("train.eval_every", "2"),
                                        ("data.name", "imgs"), ("data.dir", str(tmp_path / "data")), ("train.out_dir", str(run))])
        train(cfg, show_progress=False, echo=lambda *_: None)
        runs.append(run)
    out = tmp_path / "attn.png"
    r = run_cli("show-attention", str(runs[1]), "--position", "30", "--scale", "5", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (GAP + 2 * (4 * 5 + GAP), GAP + 3 * (4 * 5 + GAP))  # 2 heads x 3 layers of 4x4
    r = cli_here("show-attention", str(runs[1]), "--position", "48")
    assert r.returncode == 2 and "--position must be in [0, 47]" in r.stderr

    from sparse_transformer.model import SparseTransformer
    from sparse_transformer.pictures import attention_weights
    import torch

    model = SparseTransformer(cfg.model)
    w = attention_weights(model, torch.randint(0, 256, (48,)), 30)
    assert w.shape == (3, 2, 31) and np.allclose(w.sum(-1), 1, atol=1e-5)
    allowed = cfg.model.full_pattern().mask(31).numpy()[30]
    assert (w[:, :, ~allowed] == 0).all()  # the strided model attends only where the pattern allows

    r = run_cli("plot", *map(str, runs), "-o", str(tmp_path / "curves.png"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "curves.png").size == (800, 500)
    r = cli_here("plot", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr
