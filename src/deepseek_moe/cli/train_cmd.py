"""``deepseek-moe train``: the flags and what they run live with training (``deepseek_moe.train.command``), which
``python -m deepseek_moe.train`` uses too."""

from __future__ import annotations

import argparse

from deepseek_moe.train.command import DESCRIPTION, add_arguments, run_command


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: the tiny preset on CPython's stdlib, minutes on CPU)",
                       description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run_command)
