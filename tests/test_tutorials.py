"""The tutorials run as users run them (offline, from the repository root) and print what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("microbatch_size", [4, 32])
def test_quickstart_trains_plainly_and_with_clipping(microbatch_size):
    result = subprocess.run(
        [sys.executable, "tutorials/quickstart.py", "--epochs", "1", "--microbatch-size", str(microbatch_size)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("plain training:") and "held-out loss" in lines[0]
    assert lines[1].startswith(f"  last step: {32 // microbatch_size} micro-batches")
    assert lines[2].startswith(f"micro-batch clipping b={microbatch_size}: held-out loss")
