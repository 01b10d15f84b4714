"""``deepseek-moe``: a thin argparse front. Each subcommand lives in its own module with ``register(subparsers)``,
which adds its parser and sets ``func(args) -> int``; add a command by adding its module to COMMANDS.

Errors people can fix (USER_ERRORS) print as ``error: ...`` and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from deepseek_moe.io import CheckpointError
from deepseek_moe.train.errors import TrainError

COMMANDS = (
    "deepseek_moe.cli.train_cmd",
    "deepseek_moe.cli.routes_cmd",
    "deepseek_moe.cli.generate_cmd",
    "deepseek_moe.cli.info_cmd",
    "deepseek_moe.cli.quantize_cmd",
    "deepseek_moe.cli.serve_cmd",
    "deepseek_moe.cli.export_cmd",
    "deepseek_moe.cli.ablate_cmd",
    "deepseek_moe.cli.merge_cmd",
    "deepseek_moe.cli.finetune_cmd",
)


class UsageError(Exception):
    """Arguments a command cannot work with (a prompt longer than the model's context, an unknown device)."""


USER_ERRORS: tuple[type[BaseException], ...] = (TrainError, CheckpointError, UsageError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-moe", description="DeepSeekMoE: train, inspect and run models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
