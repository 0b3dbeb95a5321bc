"""The quick part of the GPU check (issue 20), run by .ci/gpu before the benchmarks and the tests:

1. the card, torch and the two ceilings (a device copy, a bf16 8192^3 product);
2. backend flex against a float64 reference on the CPU, forward and gradients, for Strided and Fixed
   at N = 4,096, where rows hold several full blocks, in bfloat16 and float16 (relative errors);
3. block masks from the description at N = 2^20 against create_block_mask (_compile=True, warm).
Prints one line per result; nothing is skipped silently (an exception is printed as the result).
"""
from __future__ import annotations

import time

import torch

from sparse_transformer import patterns as P
from sparse_transformer.attention import attention, flex
from sparse_transformer.patterns.tiles import describe


def ceilings() -> None:
    x = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for name, fn, amount, unit in (("copy", lambda: y.copy_(x), 2 * x.numel() * 2, "TB/s"),
                                   ("bf16 matmul 8192^3", lambda: a @ b, 2 * 8192**3, "TFLOP/s")):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        torch.cuda.synchronize()
        print(f"ceiling {name}: {amount * 10 / (start.elapsed_time(end) / 1e3) / 1e12:.0f} {unit}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b).norm() / b.norm().clamp(min=1e-12))


def correctness() -> None:
    g = torch.Generator().manual_seed(1)
    n = 4096
    for p in (P.Strided(64), P.Strided(256), P.Fixed(128, 32)):
        q, k, v, do = (torch.randn(1, 4, n, 64, generator=g, dtype=torch.float64) for _ in range(4))
        want = attention(*(t.requires_grad_() for t in (q, k, v)), p, backend="reference")
        want = (want, *torch.autograd.grad(want, (q, k, v), do))
        for dtype in (torch.bfloat16, torch.float16):
            for block in (128,):  # 64, 32 and 16 failed to lower on the H200 with torch 2.11 (kernel tiles of 128)
                try:
                    qc, kc, vc = (t.detach().cuda().to(dtype).requires_grad_() for t in (q, k, v))
                    out = flex.flex_attention_sparse(qc, kc, vc, p, 64**-0.5, block=block)
                    got = (out, *torch.autograd.grad(out, (qc, kc, vc), do.cuda().to(dtype)))
                    errs = " ".join(f"{rel(a, b):.1e}" for a, b in zip(got, want))
                    print(f"flex {p!r} {str(dtype)[6:]} block {block}: rel err out dq dk dv {errs}")
                except Exception as e:  # noqa: BLE001 - the failure is the result
                    print(f"flex {p!r} {str(dtype)[6:]} block {block}: FAILED {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}")


def block_mask_times(n: int = 2**20) -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    for p in (P.Strided(1024), P.Fixed(1024, 32)):
        best = 1e9
        for _ in range(3):
            flex.block_masks.cache_clear()
            describe.cache_clear()
            t = time.perf_counter()
            flex.block_masks(p, n, 128, "cuda")
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        print(f"ours {p!r}: block masks at N={n} in {best * 1e3:.1f} ms (CPU build + copy to the GPU)")
        allowed = p.mask_mod(n, "cuda")

        def mm(b, h, i, j):
            return allowed(i, j)

        try:
            create_block_mask(mm, None, None, n, n, device="cuda", _compile=True)  # compiles
            torch.cuda.synchronize()
            t = time.perf_counter()
            create_block_mask(mm, None, None, n, n, device="cuda", _compile=True)
            torch.cuda.synchronize()
            print(f"create_block_mask(_compile=True) {p!r} at N={n}: {(time.perf_counter() - t) * 1e3:.1f} ms warm")
        except Exception as e:  # noqa: BLE001
            print(f"create_block_mask {p!r} at N={n}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
    for step in (ceilings, correctness, block_mask_times):
        t0 = time.perf_counter()
        try:
            step()
        except Exception as e:  # noqa: BLE001
            print(f"{step.__name__}: FAILED {type(e).__name__}: {e}")
        print(f"[{step.__name__}: {time.perf_counter() - t0:.0f} s]", flush=True)
