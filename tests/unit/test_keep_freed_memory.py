"""keep_freed_memory: after it, a large tensor freed and allocated again reuses the process's memory instead
of page-faulting fresh pages in (run in a subprocess: the setting is process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deepseek_moe.train.config import TrainConfig

PROBE = """
import resource, sys, torch
from deepseek_moe.device import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MB: above malloc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_is_reused_without_page_faults() -> None:
    kept, _ = probe("keep")
    if not kept:
        pytest.skip("not glibc")
    default_kept, default_faults = probe("default")
    assert not default_kept
    # By default the second 64 MB is a fresh mapping (16K faults in 4 KB pages; far fewer with transparent huge
    # pages always on); kept, it reuses the first's memory. Now and then the heap cannot grow in place (brk runs
    # into another mapping) and glibc maps the block anyway, once in a CI run here: so the best of three probes.
    faults = min(probe("keep")[1] for _ in range(3))
    assert faults < 1_000 and 4 * faults < default_faults


def test_config_field_is_checked() -> None:
    assert TrainConfig().keep_freed_memory is True
    with pytest.raises(ValueError, match="keep_freed_memory"):
        TrainConfig(keep_freed_memory="yes")  # type: ignore[arg-type]
