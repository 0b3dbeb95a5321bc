"""The native kernel on each instruction set: the standalone C check (tests/native/check_kernel.c)
built for AVX2, AVX-512 and arm64 (cross-compiled, run under qemu-user), and the build following
PyTorch's CPU capability."""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_transformer.attention import native

CHECK = Path(__file__).with_name("native") / "check_kernel.c"


def cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def build_and_run(cc: str, flags: list[str], tmp_path: Path, runner: list[str] = ()) -> str:
    exe = tmp_path / "check"
    # CH=40: the kernel takes a tile's keys in groups of 40 rows, not 2048, so that these small cases
    # cut intervals and carry the forward's softmax from group to group. KC=8: the products over a
    # tile's keys take them 8 at a time (not 128), slices that cut the causal bands. CG=3: the column
    # pass takes columns 3 at a time, so that strides of 5, 10 and 13 end in a partial group.
    for hd, extra in ((32, []), (48, []), (64, []), (32, ["-DCH=40"]), (48, ["-DKC=8", "-DCG=3"])):
        res = subprocess.run([cc, "-O2", "-std=gnu11", "-fopenmp", f"-DHD={hd}", *extra, *flags, str(CHECK), "-o",
                              str(exe), "-lm"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        run = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "FAIL" not in run.stdout and run.stdout.count("ok") >= 9
    return run.stdout


X86 = platform.machine() in ("x86_64", "AMD64")
CC = shutil.which("cc") or shutil.which("gcc")


@pytest.mark.slow
@pytest.mark.skipif(not (X86 and CC and " avx2" in cpu_flags() and " fma" in cpu_flags()),
                    reason="needs an x86-64 CPU with AVX2 and FMA and a C compiler")
def test_avx2_kernel_matches_naive_loops(tmp_path):
    out = build_and_run(CC, ["-mavx2", "-mfma"], tmp_path)
    assert "VL=8" in out


@pytest.mark.slow
@pytest.mark.skipif(not (X86 and CC and " avx512f" in cpu_flags()),
                    reason="needs an x86-64 CPU with AVX-512 and a C compiler")
def test_avx512_kernel_matches_naive_loops(tmp_path):
    out = build_and_run(CC, ["-march=native"], tmp_path)
    assert "VL=16" in out


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
                    reason="needs the arm64 cross compiler and user-mode emulation "
                           "(Debian: apt-get install gcc-aarch64-linux-gnu qemu-user)")
def test_arm64_neon_kernel_matches_naive_loops_under_qemu(tmp_path):
    out = build_and_run("aarch64-linux-gnu-gcc", ["-march=armv8-a", "-static"], tmp_path, ["qemu-aarch64"])
    assert "VL=4" in out


@pytest.mark.parametrize("machine,capability,name,flag", [
    ("x86_64", "AVX512", "avx512", "-march=native"),
    ("x86_64", "AVX2", "avx2", "-mavx2"),
    ("x86_64", "DEFAULT", "x86", None),
    ("aarch64", "DEFAULT", "neon", "-mcpu=native"),
    ("arm64", "SVE256", "neon", "-mcpu=native"),
])
def test_target_follows_the_cpu_capability(machine, capability, name, flag):
    got, flags = native.target(machine, capability)
    assert got == name
    assert (flag in flags) if flag else flags == []


def fresh_python(code: str, env: dict, tmp_path: Path) -> str:
    env = {**os.environ, "SPARSE_TRANSFORMER_CACHE": str(tmp_path / "cache"), **env}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (X86 and CC and " avx512f" in cpu_flags()), reason="needs an AVX-512 machine")
def test_aten_cpu_capability_avx2_builds_the_avx2_kernel(tmp_path):
    out = fresh_python("from sparse_transformer.attention import native; print(native.describe(16))",
                       {"ATEN_CPU_CAPABILITY": "avx2"}, tmp_path)
    assert "avx2 (8 floats/vector" in out
    assert list((tmp_path / "cache").glob("native-avx2-hd16-*.so"))


@pytest.mark.slow
@pytest.mark.skipif(CC is None, reason="needs a C compiler")
def test_compile_fullgraph_works_from_the_first_call(tmp_path):
    # A fresh process and an empty kernel cache: the kernel is built while torch.compile traces.
    code = """
import torch, sparse_transformer as sp
from sparse_transformer import patterns as P
f = lambda q: sp.attention(q, q, q, P.Strided(8))
q = torch.randn(1, 2, 40, 16, requires_grad=True)
got = torch.compile(f, fullgraph=True)(q)
got.sum().backward()
want = sp.attention(q.detach(), q.detach(), q.detach(), P.Strided(8), backend="reference")
assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
print("ok")
"""
    assert "ok" in fresh_python(code, {}, tmp_path)
    assert list((tmp_path / "cache").glob("native-*-hd16-*.so")), "the kernel should have been built"
