"""Start a module on N local processes through torch.distributed.run (torchrun), as ``--nproc N`` does."""

from __future__ import annotations


class LaunchFailed(RuntimeError):
    """A process exited non-zero or was killed; the message names each one."""


def launch(module: str, argv: list[str], nproc: int) -> None:
    """``python -m module *argv`` on ``nproc`` processes of this machine (torchrun --standalone); returns when
    all have exited, raising LaunchFailed when any failed (torchrun then stops the others)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "-m", module, *argv])
    except ChildFailedError as e:
        what = ", ".join(f"rank {r} " + (f"killed by signal {-f.exitcode}" if f.exitcode < 0 else f"exit {f.exitcode}")
                         for r, f in sorted(e.failures.items()))
        raise LaunchFailed(what) from e


__all__ = ["LaunchFailed", "launch"]
