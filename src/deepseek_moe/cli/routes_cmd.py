"""``deepseek-moe routes RUN_DIR``: per-layer expert load of a run, and its routing heatmap redrawn."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("routes", help="print per-layer expert load of a training run and redraw its heatmap",
                       description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", help="where to write the heatmap (default RUN_DIR/routing_heatmap.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deepseek_moe.train.report import routes_report

    print(routes_report(args.run_dir, args.out))
    return 0
