"""Rank bodies for the DCP checkpoint tests (run by ``harness.run_ranks(..., module="dcp_workers")``).

Each runs part of a training run with the N-process Trainer (the default strategy ``start_strategy`` picks):
``DSMOE_ASSIGN`` (JSON list of config assignments), ``DSMOE_RESUME`` ("1": continue the run in ``out``),
``DSMOE_RESAVE`` (a directory to checkpoint the restored state into, before any step), ``DSMOE_SAVE_AT``
(comma-separated steps to checkpoint at; the last is where the leg stops), ``DSMOE_KILL_AT``
(a step whose save rank 0 SIGKILLs itself in, after writing its shards and before the directory is complete).
Rank 0 appends each step's losses to ``DSMOE_LOG`` (JSON lines) as it goes, so a killed leg still reports.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from harness import rank_main


def _kill_inside_the_writer(main: bool) -> None:
    """The main rank dies right after DCP wrote its shard file: mid-save, no .metadata, no rename."""
    from torch.distributed.checkpoint import FileSystemWriter

    write = FileSystemWriter.write_data

    def write_then_die(self: Any, plan: Any, planner: Any) -> Any:
        done = write(self, plan, planner)
        done.wait()
        if main:
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return done

    FileSystemWriter.write_data = write_then_die  # type: ignore[method-assign]


def leg(trainer: Any, saves: list[int], log: Path, *, kill_at: int = 0) -> None:
    """Steps from where ``trainer`` (set up) stands to ``saves[-1]``, validating and checkpointing at ``saves``."""
    main = trainer.strategy.is_main
    for step in range(trainer.start, saves[-1]):
        r = trainer.step(step)
        record: dict[str, Any] = {"step": r.step, "loss": r.ce_loss + r.aux_loss}
        if r.step in saves:
            record["val_loss"], _ = trainer.evaluate(trainer.val_batches)
        if main:
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if r.step in saves:
            if r.step == kill_at:
                _kill_inside_the_writer(main)
            trainer.save(r.step)


def resave(trainer: Any, state_dir: Path) -> None:
    """Checkpoint the state just restored, unchanged, into ``state_dir``: equal to the checkpoint it was read from
    when loading on this process count lost nothing."""
    from deepseek_moe.train.checkpoint import save_checkpoint

    save_checkpoint(state_dir, trainer.start, model=trainer.model, optimizer=trainer.optimizer,
                    scheduler=trainer.scheduler, trainer={"data": trainer.data.train.state_dict()}, keep_last=1,
                    strategy=trainer.strategy)


def train_leg(rank: int, world: int) -> dict[str, Any]:
    from deepseek_moe.train.config import resolve_config
    from deepseek_moe.train.loop import Trainer

    cfg = resolve_config(assignments=json.loads(os.environ["DSMOE_ASSIGN"]))
    trainer = Trainer(cfg, resume=os.environ.get("DSMOE_RESUME") == "1", progress=False)
    trainer.setup()
    if os.environ.get("DSMOE_RESAVE"):
        resave(trainer, Path(os.environ["DSMOE_RESAVE"]))
    leg(trainer, [int(s) for s in os.environ["DSMOE_SAVE_AT"].split(",")], Path(os.environ["DSMOE_LOG"]),
        kill_at=int(os.environ.get("DSMOE_KILL_AT", "0")))
    trainer.strategy.close()
    return {"start": trainer.start}


def main(worker: str) -> None:
    rank_main(globals(), worker)
