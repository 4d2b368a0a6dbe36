"""The `recsys` command: build, inspect, search, serve, demo and evaluate.

One module per command group; each adds its parsers and runs its commands. Heavy modules
(torch, transformers, FAISS) are imported inside the commands, so `recsys --help` and
`recsys bundle info` stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from recsys.app.cli.build import add_build
from recsys.app.cli.bundle import add_bundle
from recsys.app.cli.catalog import add_catalog
from recsys.app.cli.common import settings_from_args
from recsys.app.cli.datasets import add_datasets
from recsys.app.cli.demo import add_demo
from recsys.app.cli.evaluate import add_evaluate
from recsys.app.cli.retrain import add_retrain
from recsys.app.cli.search import add_search
from recsys.app.cli.serve import add_serve
from recsys.app.logs import configure_logging
from recsys.core.errors import DataLoss, NotReady, RecsysError, first_line

# What a failure exits with, so scripts and the retrain Job's failure policy can tell a mistake
# from an outage (worth trying again) from damage (someone has to repair it). 3 is retrain's
# refusal: recsys.app.retrain.EXIT_REFUSED, not imported here because that module loads pandas.
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 4
EXIT_DATA_LOSS = 5
EXIT_INTERRUPTED = 130
EXIT_CODES_HELP = (
    f"exit codes: 0 done; {EXIT_BAD_INPUT} bad input (a mistake in the arguments or an input "
    "file); 3 `recsys retrain`'s gate refused the candidate; "
    f"{EXIT_UNREACHABLE} a dependency is unreachable (the PostgreSQL change log, Milvus, a gRPC "
    f"service); {EXIT_DATA_LOSS} stored data is corrupt (e.g. a bundle version's files differ "
    "from its manifest). Each failure prints one line on stderr."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Parses arguments and runs a subcommand; a RecsysError prints one line, no traceback, and
    exits with its code (exit_code)."""
    # Nothing may be fetched from a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        if args.command == "serve":
            # The process's one Settings, built once: it also holds serve's log level.
            args.settings = settings_from_args(args)
            configure_logging(args.settings.log_level)
        else:
            configure_logging(args.log_level)
        return handler(args)
    except RecsysError as exc:
        print(f"recsys: error: {first_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def exit_code(exc: RecsysError) -> int:
    """The exit code of a failed command (EXIT_CODES_HELP says what each means)."""
    if isinstance(exc, NotReady):
        return EXIT_UNREACHABLE
    if isinstance(exc, DataLoss):
        return EXIT_DATA_LOSS
    return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    """The `recsys` argument parser; builds without importing any heavy module."""
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Two-stage search & recommendation over gRPC: build a bundle, serve it, evaluate it.",
        epilog=EXIT_CODES_HELP,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        add_build,
        add_retrain,
        add_bundle,
        add_catalog,
        add_search,
        add_datasets,
        add_serve,
        add_demo,
        add_evaluate,
    ):
        add(sub)
    return parser
