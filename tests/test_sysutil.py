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
