"""`recsys demo`: the sample bundle built if needed, served, and a few recommendations shown."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recsys.app.cli.common import Deferred, add_log_level, resolve


def add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="build the sample bundle if needed, serve it and show a few recommendations",
        description="Builds the embedded sample bundle when absent, starts retrieval, ranking and the "
        "gateway, sends a few Recommend calls and prints the answers; then keeps serving until "
        "interrupted (or exits with --once).",
    )
    p.add_argument(
        "--bundle",
        type=Path,
        default=Path("artifacts/sample"),
        metavar="ROOT",
        help="bundle root (default artifacts/sample)",
    )
    p.add_argument("--once", action="store_true", help="exit after printing the table")
    p.add_argument(
        "--ranker-steps",
        type=int,
        default=Deferred(_ranker_steps),
        metavar="N",
        help="fine-tuning steps when building the sample bundle (default %(default)s)",
    )
    add_log_level(p)
    p.set_defaults(handler=run_demo)


def _ranker_steps() -> int:
    """`recsys demo`'s fine-tuning steps: the demo's short schedule."""
    from recsys.app.demo import DEMO_RANKER_STEPS

    return DEMO_RANKER_STEPS


def run_demo(args: argparse.Namespace) -> int:
    from recsys.app import demo

    return demo.run_demo(
        args.bundle,
        once=args.once,
        ranker_steps=resolve(args.ranker_steps),
        log_level=args.log_level,
    )
