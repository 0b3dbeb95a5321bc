"""Data-parallel training with torchrun on the CPU (gloo): same losses as one process, resume with another
number of processes, and a dead rank ending the run cleanly."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import losses
from sparse_transformer.train.config import build_config
from sparse_transformer.train.loop import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

BASE = [("model.n_ctx", "64"), ("model.d_model", "32"), ("model.n_layer", "2"), ("model.n_head", "2"),
        ("model.stride", "8"), ("model.dropout", "0"), ("train.batch_size", "4"), ("train.warmup", "2"),
        ("train.eval_max_bytes", "2000"), ("train.sample_bytes", "0"), ("train.log_every", "1"),
        ("train.steps", "20"), ("train.threads", "1"), ("train.schedule", "steps"), ("train.time_limit", "0"),
        ("train.precision", "float32")]  # explicit: "auto" may pick bfloat16, and the comparisons are exact


def torchrun(n: int, out: Path, *extra: tuple[str, str], wait: bool = True):
    args = [f"--{k}={v}" for k, v in BASE + [("train.out_dir", str(out)), *extra]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "sparse_transformer", "train", "--no-progress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def one_process(out: Path, *extra, resume=False):
    cfg = build_config(None, None, BASE + [("train.out_dir", str(out)), *extra])
    return train(cfg, resume=resume, show_progress=False, echo=lambda *_: None)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    one_process(out)
    return out


@pytest.mark.slow
def test_two_processes_match_one(single, tmp_path):
    r = torchrun(2, tmp_path / "ddp", ("train.dynamic_eval_lr", "0.2"))
    a, b = losses(single), losses(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5, (a, b)
    assert r.stdout.count("validation:") == 1  # rank 0 alone prints
    assert r.stdout.count("adapting as it reads") == 1  # dynamic evaluation on rank 0 while the other waits
    ckpt = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 20


@pytest.mark.slow
def test_grad_accumulation_and_float16_reduce(single, tmp_path):
    torchrun(2, tmp_path / "acc", ("train.grad_accum", "2"))
    a, b = losses(single), losses(tmp_path / "acc")
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    torchrun(2, tmp_path / "fp16", ("train.grad_reduce_dtype", "float16"), ("train.steps", "20"))
    c = losses(tmp_path / "fp16")
    assert abs(c[1] - a[1]) < 1e-6  # the first loss precedes any update
    assert 0 < max(abs(c[s] - a[s]) for s in a) < 0.05  # float16 gradients: close, not equal


@pytest.mark.slow
def test_resume_two_processes_with_one(single, tmp_path):
    out = tmp_path / "resumed"
    torchrun(2, out, ("train.stop_at", "10"))
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 10
    one_process(out, resume=True)
    a, b = losses(single), losses(out)
    assert sorted(b) == list(range(1, 21))
    assert max(abs(a[s] - b[s]) for s in range(11, 21)) < 1e-5, (a, b)


@pytest.mark.slow
def test_fsdp_matches_and_resumes_with_one_process(single, tmp_path):
    out = tmp_path / "fsdp"
    torchrun(2, out, ("train.parallel", "fsdp"), ("train.stop_at", "10"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["shards"] == "ckpt-shards-00000010" and (out / ckpt["shards"]).is_dir()
    one_process(out, ("train.parallel", "fsdp"), resume=True)  # one process reads the two processes' shards
    a, b = losses(single), losses(out)
    assert max(abs(a[s] - b[s]) for s in range(1, 21)) < 1e-5, (a, b)


def _worker_pids(parent: int, rank: int) -> list[int]:
    """The workers torchrun ``parent`` started with RANK=rank: only this test's run, never another's."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (p / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            pids.append(int(p.name))
    return pids


def _long_run_with_a_checkpoint(out: Path):
    """A 2-process run that would train for long, once it has written its first checkpoint."""
    proc = torchrun(2, out, ("train.steps", "100000"), ("train.ckpt_every", "2"), wait=False)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not (out / "ckpt.pt").exists():
        proc.kill()
        raise AssertionError("no checkpoint was written")
    return proc


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_a_dead_rank_stops_the_run_and_the_checkpoint_loads(tmp_path):
    out = tmp_path / "killed"
    proc = _long_run_with_a_checkpoint(out)
    try:
        pids = _worker_pids(proc.pid, 1)
        assert pids, "rank 1 not found"
        t0 = time.time()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert time.time() - t0 < 60
        assert "lost contact with another process" in err or "ChildFailedError" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] >= 2 and "model" in ckpt


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_exit_0(tmp_path):
    """SLURM-style preemption under torchrun: the ranks agree on the step (the stop request rides on the
    loss all-reduce), rank 0 writes the checkpoint, every process exits 0, and the log ends at it."""
    out = tmp_path / "term"
    proc = _long_run_with_a_checkpoint(out)
    try:
        pids = _worker_pids(proc.pid, 1)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert f"SIGTERM: stopped at step {step} with a checkpoint" in err, err[-2000:]
    assert max(losses(out)) == step  # the log ends where the checkpoint is
