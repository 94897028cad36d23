"""featinv.host_memory: freed few-MB blocks stay in the process instead of page-faulting back in every step."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from featinv import host_memory

_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a child process: minor page faults of 50 "steps" that each allocate and write four 3 MB
# blocks (the size of a local_mlp step's activations), then free them; then the same after
# keep_freed_memory().
_CHILD = """
import json, resource
import numpy as np
from featinv import host_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):  # a step: a few activations alive at once, all freed at its end
        blocks = [np.ones(3 << 18, dtype=np.float32) for _ in range(4)]  # 3 MB each, every page written
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
applied = host_memory.keep_freed_memory()
print(json.dumps({"default": default, "applied": applied, "kept": faults()}))
"""


def _child(env_extra: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", _CHILD], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _GLIBC, reason="the setting is glibc malloc's; this platform has another allocator")
def test_freed_blocks_are_reused_instead_of_faulted_back_in():
    result = _child()
    assert result["applied"] is True
    # glibc's default gives the freed blocks back and faults them in again: ~3,000 faults a step
    # (4 × 770 pages). Kept: the first step faults them in, the others reuse them.
    assert result["default"] > 50 * 4 * 300
    assert result["kept"] < 2 * 4 * 770


@pytest.mark.skipif(not _GLIBC, reason="the setting is glibc malloc's; this platform has another allocator")
def test_the_users_own_malloc_settings_stand():
    result = _child({"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert result["applied"] is False


def test_setting_is_made_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setattr(host_memory, "_apply", lambda: calls.append(1) or True)
    assert host_memory.keep_freed_memory() and host_memory.keep_freed_memory()
    assert calls == [1]
