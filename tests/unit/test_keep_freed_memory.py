"""keep_freed_memory: after it, a large tensor freed and allocated again reuses the process's memory instead
of page-faulting fresh pages in; release_freed_memory: a freed tensor's memory leaves the process at once (each
run in a subprocess: the settings are process-wide)."""

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
# Smaller than the freed block: a small allocation in between may take the hole's first bytes (under load here,
# 9 runs in 25 did), and an equal block would then no longer fit in it.
torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
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
    # By default the 48 MB block is a fresh mapping (12K faults in 4 KB pages; far fewer with transparent huge
    # pages always on); kept, it reuses the freed 64 MB's memory.
    _, faults = probe("keep")
    assert faults < 1_000 and 4 * faults < default_faults


def test_config_field_is_checked() -> None:
    assert TrainConfig().keep_freed_memory is True
    with pytest.raises(ValueError, match="keep_freed_memory"):
        TrainConfig(keep_freed_memory="yes")  # type: ignore[arg-type]


RELEASE_PROBE = """
import os, sys, torch
from deepseek_moe.device import release_freed_memory
released = release_freed_memory() if sys.argv[1] == "release" else False
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * page
retained = []
for _ in range(3):  # the first free raises malloc's default mmap threshold; the later blocks come from the heap
    before = rss()
    t = torch.empty(8 << 20, dtype=torch.uint8).fill_(1)
    small = torch.ones(1024)  # a live block above it keeps the heap from trimming its top
    del t
    retained.append(rss() - before)
    keep = small
print(released, sum(retained[1:]))  # after the first block: what the heap keeps resident (8 MB, reused later)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_released_memory_leaves_the_process() -> None:
    def run(mode: str) -> tuple[bool, int]:
        out = subprocess.run([sys.executable, "-c", RELEASE_PROBE, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0] == "True", int(out[1])

    released, kept_bytes = run("release")
    if not released:
        pytest.skip("not glibc")
    default_released, default_bytes = run("default")
    assert not default_released
    # By default the freed 8 MB stays in the heap, resident; released, it is unmapped on free.
    assert default_bytes > 6 << 20 and kept_bytes < 1 << 20


def test_release_is_a_config_value() -> None:
    assert TrainConfig(keep_freed_memory="release").keep_freed_memory == "release"
    with pytest.raises(ValueError, match="keep_freed_memory .* must be a bool or 'release'"):
        TrainConfig(keep_freed_memory="keep")  # type: ignore[arg-type]
