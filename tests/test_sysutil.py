import subprocess
import sys

import pytest

CHECK = """
import sys
from sparse_transformer.sysutil import tune_malloc
print(tune_malloc())
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_tune_malloc_applies_on_linux_and_can_be_turned_off(monkeypatch):
    # A fresh process each time: the settings are process-wide.
    on = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert on.stdout.strip() == "True"
    monkeypatch.setenv("SPARSE_TRANSFORMER_NO_MALLOC_TUNING", "1")
    off = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "False"


def test_make_dirs_creates_and_fsyncs_each_new_folder_into_its_parent(tmp_path, monkeypatch):
    import os

    from sparse_transformer import sysutil

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)
        return real(fd)

    monkeypatch.setattr(sysutil.os, "fsync", spy)
    sysutil.make_dirs(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    if os.path.exists("/proc/self/fd"):
        assert synced == [str(tmp_path), str(tmp_path / "a")]
