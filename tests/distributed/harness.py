"""Run a function on N gloo processes on CPU, once, and bring back what each rank returns.

Each rank is a fresh ``python`` subprocess (one thread) that joins an env:// process group on a free port and
calls ``workers.<name>(ctx)``; results come back through ``torch.save`` files. A rank that fails makes the
harness stop the rest within ``grace_s`` and raise with every rank's stderr, so a broken rank never hangs CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_main(functions: dict[str, Any], worker: str) -> None:
    """The body of a rank process (each workers module's ``main``): run ``functions[worker](rank, world)``, save
    what it returns where the harness reads it, and on any failure print it and exit non-zero at once."""
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        result = functions[worker](rank, world)
        torch.save(result, os.environ.get("DSMOE_RESULT", f"{tempfile.gettempdir()}/rank{rank}.pt"))
    except BaseException as e:  # noqa: BLE001  (report, then fail this rank)
        print(f"rank {rank} of {world} failed in {worker}: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


class RanksFailed(RuntimeError):
    def __init__(self, message: str, codes: list[int | None], stderr: list[str]) -> None:
        super().__init__(message)
        self.codes, self.stderr = codes, stderr


def run_ranks(world: int, worker: str, *, timeout_s: float = 240.0, grace_s: float = 30.0,
              extra_env: dict[str, str] | None = None, module: str = "workers") -> list[Any]:
    """``<module>.<worker>`` on ``world`` processes (``module`` in tests/distributed, with a ``main(worker)``
    like workers.py's); returns each rank's result (rank order)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs, errs = [], []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1", "DSMOE_RESULT": f"{tmp}/rank{rank}.pt", **(extra_env or {})}
            err = open(f"{tmp}/rank{rank}.err", "w+")  # noqa: SIM115  (closed below)
            errs.append(err)
            code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import {module}; "
                    f"{module}.main({worker!r})")
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=err, stderr=err))
        start, failed_at = time.monotonic(), None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if now - start > timeout_s or (failed_at is not None and now - failed_at > grace_s):
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.05)
        codes = [p.wait() for p in procs]
        stderr = []
        for err in errs:
            err.seek(0)
            stderr.append(err.read())
            err.close()
        if any(c != 0 for c in codes):
            tails = "\n".join(f"--- rank {r} (exit {c}) ---\n{s[-3000:]}" for r, (c, s) in
                              enumerate(zip(codes, stderr, strict=True)))
            raise RanksFailed(f"{worker} on {world} ranks failed: exit codes {codes}\n{tails}", codes, stderr)
        return [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(world)]
