"""Logs that grew after the packaged sample: the sample's users shopping on after its window.

They replay the sample generator's draws (recsys.app.sample), so they live with the tests that
use them rather than in the package.
"""

from __future__ import annotations

import csv
from pathlib import Path

from recsys.app.sample import (
    START_EPOCH,
    WINDOW_SECONDS,
    Event,
    Rng,
    Shop,
    make_catalog,
    make_users,
    sample_paths,
    simulate_session,
)


def later_sessions(days: int, seed: int = 8, sample_seed: int = 7) -> list[Event]:
    """The sample's users (same tastes) shopping for `days` more after its window, with a fresh
    seed: what a log holds some time after the sample bundle was built."""
    rng = Rng(sample_seed)
    shop = Shop(make_catalog(rng))
    users = make_users(rng)  # the first draws after the catalog's, as in make_interactions
    later, start, span = Rng(seed), START_EPOCH + WINDOW_SECONDS, days * 24 * 3600
    events: list[Event] = []
    for user in users:
        count = max(1, round(user.sessions * span / WINDOW_SECONDS))
        for begin in sorted(start + later.integer(0, span) for _ in range(count)):
            events.extend(simulate_session(later, shop, user, begin, exploring=later.chance(0.1)))
    events.sort(key=lambda e: (e.timestamp, e.user_id))
    return events


def write_grown_log(path: Path, days: int = 30, seed: int = 8) -> Path:
    """The sample interactions followed by `later_sessions(days, seed)`, as one CSV."""
    rows = [
        [e.user_id, e.item_id, str(e.timestamp), str(e.weight), e.query]
        for e in later_sessions(days, seed)
    ]
    text = sample_paths()[1].read_text(encoding="utf-8")
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return path
