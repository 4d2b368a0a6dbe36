"""What several `recsys` commands share: deferred defaults, --log-level, --change-log and the
process's Settings from flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Generic, TypeVar

from recsys.app.logs import LEVELS
from recsys.core.errors import InvalidInput
from recsys.core.settings import Settings, default

Number = TypeVar("Number", int, float)

FOLDED = (
    "its changes up to now are folded into the catalog and recorded with their position, so "
    "replicas replay only what comes after"
)


class Deferred(Generic[Number]):
    """A default whose home module loads torch: read only for --help or when the flag is unset."""

    def __init__(self, load: Callable[[], Number]) -> None:
        self.load: Callable[[], Number] = load

    def __str__(self) -> str:
        return str(self.load())


def resolve(value: Number | Deferred[Number]) -> Number:
    """A flag's value, reading a deferred default from its home."""
    return value.load() if isinstance(value, Deferred) else value


def add_log_level(p: argparse.ArgumentParser, default: str = "INFO") -> None:
    """`--log-level` of a command other than serve (serve's is a setting: RECSYS_LOG_LEVEL)."""
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default=default,
        help=f"our log lines at this level; libraries log only errors unless DEBUG (default {default})",
    )


def add_change_log(p: argparse.ArgumentParser, purpose: str, required: bool = False) -> None:
    """--change-log URL and --change-log-table NAME; `purpose` says what the command does with
    the log."""
    p.add_argument(
        "--change-log",
        required=required,
        metavar="URL",
        help="the catalog change log retrieval replicas share (their RECSYS_CHANGE_LOG_URL, "
        "postgresql://USER@HOST:PORT/DB; give the password by PGPASSWORD or PGPASSFILE, not "
        f"here): {purpose}",
    )
    p.add_argument(
        "--change-log-table",
        default=default("change_log_table"),
        metavar="NAME",
        help="its table (default %(default)s)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The process's one Settings: flags override RECSYS_* env, which overrides defaults."""
    overrides = {
        key.removeprefix("setting_"): value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }
    try:
        return Settings(**overrides)
    except ValueError as exc:
        # pydantic's message is a count line, then the field and its error: those two name it.
        first = str(exc).splitlines()
        raise InvalidInput(" ".join(first[1:3]) if len(first) > 2 else str(exc)) from None
