"""`recsys serve`: one service, or all three as separate servers."""

from __future__ import annotations

import argparse
from typing import Any

from recsys.core.settings import Settings
from recsys.rpc.launcher import SERVICES


def add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run one service, or all three as separate servers",
        description="Serve a bundle over gRPC with health checking, reflection and Prometheus metrics. "
        "Stops on SIGTERM/SIGINT after draining for the grace period.",
    )
    p.add_argument("service", choices=(*SERVICES, "all"))
    _add_settings_flags(p)
    p.set_defaults(handler=run_serve)


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field (--gateway-port, --max-k, ...); unset flags leave env/defaults."""
    group = p.add_argument_group("settings (each also read from RECSYS_<NAME>)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "RECSYS_" + name.upper()
        default = field.default
        group.add_argument(
            flag,
            dest=f"setting_{name}",
            default=None,
            metavar=name.upper(),
            help=f"{field.description or ''} [{env}, default {default}]".strip(),
        )


def run_serve(args: argparse.Namespace) -> int:
    settings: Settings = args.settings  # built by main(), which needed its log level first
    if args.service == "all":
        from recsys.app.services import run_all

        return run_all(settings)
    from recsys.app.services import run_service

    run_service(args.service, settings)
    return 0
