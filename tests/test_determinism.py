"""A repeated backward on the same weights and batch gives the same gradients
with two threads (issue 17, defect 0).

The advanced-index gather ``table[idx]`` has a backward (index_put_ with
accumulate) that sums repeated rows in a thread-dependent order on the CPU; the
model must not use one where indices repeat.
"""
import torch

from sparse_transformer.model import SparseTransformer
from sparse_transformer.model.config import ModelConfig


def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    return before


def test_repeated_backward_gives_identical_gradients():
    before = _two_threads()
    try:
        torch.manual_seed(0)
        # The quick preset's shape of model: strided, multihead, rotary; stride-8 tables are hit 32 times each.
        cfg = ModelConfig(n_ctx=256, d_model=128, n_layer=2, n_head=2, stride=8, rotary=True, dropout=0.0)
        model = SparseTransformer(cfg)
        for p in model.parameters():  # non-zero position tables, so their gradients matter
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
        x = torch.randint(0, 256, (4, 256))
        grads = []
        for _ in range(8):
            model.zero_grad(set_to_none=True)
            _loss(model, x).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        for g in grads[1:]:
            for name, grad in g.items():
                assert torch.equal(grad, grads[0][name]), f"gradient of {name} changed between identical backwards"
    finally:
        torch.set_num_threads(before)


def _loss(model, x):
    logits, _ = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x.reshape(-1))
