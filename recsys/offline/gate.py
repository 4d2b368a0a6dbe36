"""The retrain gate: a candidate version against the live one, on the same held-out users.

Both versions rank each user's history in this process as serving would (pool, first pass,
cross-encoder head, second pass); the candidate passes when its NDCG@10 is at most `max_drop`
(relative) below the live version's. A candidate whose files differ from its manifest, or that
fails to load or rank, is refused with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from recsys.core.bundle import Bundle
from recsys.core.errors import first_line
from recsys.core.scoring import ndcg_of
from recsys.offline.heldout import HeldOut
from recsys.offline.splits import hold_out_recent

if TYPE_CHECKING:  # the models load torch: imported where a gate runs, not with the CLI
    from ranking_service.cf import CFModel
    from ranking_service.item_item import ItemItem
    from ranking_service.ranker import Ranker
    from recsys.core.domain import Candidate, RankContext

log = logging.getLogger(__name__)

MAX_DROP = 0.05  # the candidate's NDCG@10 may be at most 5% below the live version's
GATE_USERS = 500  # held-out users ranked by each version, at most (seeded sample)
MIN_GATE_USERS = 10  # fewer held-out users than this: no judgement, the candidate is refused


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict: NDCG@10 of each version on the same held-out users, or why not."""

    passed: bool
    reason: str
    users: int = 0
    live: float | None = None
    candidate: float | None = None
    max_drop: float = MAX_DROP

    def lines(self, live: str, candidate: str) -> list[str]:
        """What `recsys retrain` prints about the comparison."""
        if self.live is None or self.candidate is None:
            return [f"gate: {self.reason}"]
        diff = self.candidate - self.live
        relative = f" ({diff / self.live:+.1%})" if self.live else ""
        return [
            f"gate: recommend NDCG@10 on {self.users} held-out users: live {live} "
            f"{self.live:.4f}, candidate {candidate} {self.candidate:.4f}, "
            f"difference {diff:+.4f}{relative}",
            f"gate: tolerance: at most {self.max_drop:.1%} below live -> {self.reason}",
        ]

    def record(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "users": self.users,
            "live_ndcg@10": self.live,
            "candidate_ndcg@10": self.candidate,
            "max_drop": self.max_drop,
        }


def gate(
    live: Bundle,
    candidate: Bundle,
    interactions: pd.DataFrame,
    max_drop: float = MAX_DROP,
    gate_users: int = GATE_USERS,
    device: str = "auto",
) -> GateResult:
    """Both versions' NDCG@10 on the same held-out users; a candidate whose files differ from its
    manifest, or that fails to load or rank, is refused with the reason."""
    from ranking_service.cf import ALSParams, CFModel
    from ranking_service.item_item import refitted

    bad = candidate.verify()
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        return GateResult(False, f"refused: checksum mismatch or missing file: {shown}")
    built: dict[str, Any] = candidate.manifest.get("settings", {})
    train, held = hold_out_recent(interactions, int(built.get("holdout_per_user", 10)))
    last = live.manifest.get("counts", {}).get("last_timestamp")
    if last is None:
        log.warning("gate: %s records no last interaction; it may have seen some", live.version)
    else:
        held = held[held["timestamp"] > last]
    least = built.get("relevant_min_weight")
    users = HeldOut.of(train, held, None if least is None else float(least))
    chosen = users.users(seed=int(built.get("seed", 0)), limit=gate_users)
    if len(chosen) < MIN_GATE_USERS:
        return GateResult(
            False,
            f"refused: only {len(chosen)} users with held-out interactions after {live.version}'s "
            f"last one (need {MIN_GATE_USERS})",
        )
    try:
        # The CF the candidate's fusion was fitted with (its ALS values): the one it serves is
        # refitted on the held-out interactions too, and would be scored on answers it was
        # trained on.
        section = candidate.manifest.get("cf", {})
        params = ALSParams.of(section)
        cf = CFModel.train(train, seed=int(built.get("seed", 0)), **params.kwargs())
        ours = recommend_ndcg(candidate, users, chosen, device, (cf, refitted(section, train)))
    except Exception as exc:  # any failure to load or rank refuses the candidate
        return GateResult(False, f"refused: the candidate fails to load or rank: {first_line(exc)}")
    theirs = recommend_ndcg(live, users, chosen, device)
    passed = ours >= theirs * (1 - max_drop)
    reason = "pass" if passed else f"refused: more than {max_drop:.1%} below the live version"
    return GateResult(passed, reason, len(chosen), round(theirs, 4), round(ours, 4), max_drop)


def recommend_ndcg(
    bundle: Bundle,
    held: HeldOut,
    users: Sequence[str],
    device: str = "auto",
    collaborative: tuple[CFModel, ItemItem | None] | None = None,
) -> float:
    """Mean NDCG@10 of the version's answers to each user's history-only Recommend, ranked as
    serving ranks (`collaborative`: other CF and item-to-item models in place of the
    version's)."""
    from gateway.candidates import PoolPolicy
    from ranking_service.ranker import Ranker
    from ranking_service.train import EXAMPLE_HISTORY
    from recsys.core.settings import Settings, default
    from recsys.offline.local import gather_pools, pool_request
    from retrieval_service.retriever import Retriever

    started = time.perf_counter()
    built: dict[str, Any] = bundle.manifest.get("settings", {})
    pool = int(built.get("candidate_pool", default("default_candidate_pool")))
    policy = PoolPolicy(
        cf_share=float(built.get("cf_candidate_share", default("cf_candidate_share")))
    )
    retriever = Retriever.load(bundle, state_dir=None, device=device)
    try:
        ranker = Ranker.load(bundle, Settings.built_in(bundle=bundle.root, device=device))
        if collaborative is not None:
            ranker = ranker.with_cf(*collaborative)
        seen = held.histories
        requests = [
            pool_request(pool, history=seen[u][:EXAMPLE_HISTORY], exclude=seen[u]) for u in users
        ]
        pools = gather_pools(requests, retriever, ranker, policy, desc=f"gate: {bundle.version}")
        values = []
        for user, gathered in zip(users, pools, strict=True):
            context, candidates = gathered.context(), gathered.candidates()
            outcome = ranker.combine(context, candidates, _head_scores(ranker, context, candidates))
            values.append(ndcg_of([s.item_id for s in outcome.scored], held.relevant[user]))
    finally:
        retriever.close()
    value = float(np.mean(values)) if values else 0.0
    log.info(
        "gate: %s NDCG@10 %.4f on %d users (%.0f s)",
        bundle.version,
        value,
        len(users),
        time.perf_counter() - started,
    )
    return value


def _head_scores(
    ranker: Ranker, context: RankContext, candidates: Sequence[Candidate]
) -> np.ndarray | None:
    """The cross-encoder's scores for the candidates serving would have it score (NaN elsewhere)."""
    from ranking_service.cross_encoder import context_text

    if ranker.scorer is None:
        return None
    rows = ranker.rerank_rows(context, candidates)
    if len(rows) == 0:
        return None
    text = context_text(context)
    ce = np.full(len(candidates), np.nan, np.float32)
    ce[rows] = ranker.scorer.score([(text, candidates[i].text) for i in rows])
    return ce
