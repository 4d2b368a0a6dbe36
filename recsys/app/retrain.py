"""`recsys retrain`: the next version built from the live one, switched to only past a quality gate.

The candidate is `recsys build` with the live version's settings and `warm_from` set (embeddings
of unchanged item texts reused, fine-tuning continued from the live cross-encoder, CF and fusion
fitted afresh), left unpublished. The gate ranks the same held-out interactions with both
versions in this process, as serving would (pool, first pass, cross-encoder head, second pass):
each user's most recent interactions in the new log (the build's fusion hold-out), only those
later than the live version's last interaction, which it never saw. CURRENT switches only when
the candidate's NDCG@10 is at most `max_drop` (relative) below the live version's; otherwise the
candidate stays aside with ROOT/<version>/rejected.json saying why.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.app.build import BuildInputs, BuildOptions, build_bundle, load_inputs
from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle, clear_rejection, publish, reject
from recsys.core.scoring import ndcg_of

log = logging.getLogger(__name__)

EXIT_SWITCHED = 0
EXIT_REFUSED = 3  # the gate kept the candidate aside (1 stays Python's crash code)
# Fine-tuning steps when continuing from the live cross-encoder: a third of a build's.
RETRAIN_RANKER_STEPS = 50
MAX_DROP = 0.05  # the candidate's NDCG@10 may be at most 5% below the live version's
GATE_USERS = 500  # held-out users ranked by each version, at most (seeded sample)
MIN_GATE_USERS = 10  # fewer held-out users than this: no judgement, the candidate is refused

# Options the live version's settings do not decide: inputs, output and this run's device.
_PER_RUN = {
    "catalog",
    "interactions",
    "queries",
    "out",
    "device",
    "split",
    "warm_from",
    "ranker",
    "student",
    "change_log_url",
    "change_log_table",
}


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


@dataclass(frozen=True)
class Retrained:
    """What one retrain did: which versions, the verdict, and whether CURRENT switched."""

    live: str
    candidate: str
    gate: GateResult

    @property
    def switched(self) -> bool:
        return self.gate.passed


def retrain_options(
    live: Bundle,
    root: Path,
    interactions: Path,
    catalog: Path | None = None,
    queries: Path | None = None,
    ranker_steps: int = RETRAIN_RANKER_STEPS,
    device: str = "auto",
) -> BuildOptions:
    """The live version's build options with the new inputs, warm-started from it; fine-tuning
    runs `ranker_steps` (recorded as the ranker's steps in the manifest). CF trains with the
    ALS values the live version's CF was trained with (those its build's search chose), with
    no search of its own."""
    from ranking_service.cf import ALSParams
    from ranking_service.distill import DistillConfig
    from ranking_service.train import RankerTrainConfig

    recorded: dict[str, Any] = live.manifest.get("settings", {})
    names = {f.name for f in fields(BuildOptions)}
    values = {k: v for k, v in recorded.items() if k in names and k not in _PER_RUN}
    chosen = ALSParams.of(live.manifest.get("cf", {}))
    values |= {
        "cf_factors": chosen.factors,
        "cf_iterations": chosen.iterations,
        "cf_regularization": chosen.regularization,
        "cf_alpha": chosen.alpha,
        "cf_weighting": chosen.weighting,
        "cf_search": False,
    }
    if values.get("encoder") is not None:
        values["encoder"] = Path(values["encoder"])
    ranker = recorded.get("ranker")
    student = recorded.get("student")
    if queries is None and recorded.get("queries"):
        if Path(recorded["queries"]).is_file():
            queries = Path(recorded["queries"])
            log.info("queries: %s, as %s was built with", queries, live.version)
        else:
            log.warning(
                "queries: %s (%s's) is gone; building without", recorded["queries"], live.version
            )
    return BuildOptions(
        catalog=catalog or live.file(bundle_files.CATALOG),
        interactions=interactions,
        out=root,
        queries=queries,
        ranker=None
        if ranker is None
        else replace(_config(RankerTrainConfig, ranker), steps=ranker_steps),
        student=None if student is None else _config(DistillConfig, student),
        device=device,
        warm_from=live,
        **values,
    )


def _config(kind: Any, recorded: dict[str, Any]) -> Any:
    """A config dataclass from its manifest record, fields it no longer has left out."""
    names = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in recorded.items() if k in names})


def retrain_inputs(options: BuildOptions, live: Bundle, catalog_given: bool) -> BuildInputs:
    """The build's inputs; without a new catalog, the live version's items as they are."""
    if catalog_given:
        return load_inputs(options)
    from recsys.app.ingest import items_to_frame
    from retrieval_service.catalog import load_catalog_items

    items = load_catalog_items(live.file(bundle_files.CATALOG))
    return load_inputs(options, catalog=items_to_frame(items))


def retrain(
    live: Bundle,
    options: BuildOptions,
    inputs: BuildInputs,
    max_drop: float = MAX_DROP,
    gate_users: int = GATE_USERS,
) -> Retrained:
    """Builds the candidate unpublished, gates it against `live` and switches or keeps it aside."""
    candidate = build_bundle(options, inputs, switch=False)
    return judge(live, candidate, inputs.interactions, max_drop, gate_users, options.device)


def judge(
    live: Bundle,
    candidate: Bundle,
    interactions: pd.DataFrame,
    max_drop: float = MAX_DROP,
    gate_users: int = GATE_USERS,
    device: str = "auto",
) -> Retrained:
    """Gates `candidate` against `live`, then publishes it or marks it refused."""
    result = gate(live, candidate, interactions, max_drop, gate_users, device)
    if result.passed:
        clear_rejection(candidate.root, candidate.version)
        publish(candidate.root, candidate.version)
        log.info("CURRENT -> %s", candidate.version)
    else:
        reject(candidate.root, candidate.version, {"live": live.version, **result.record()})
        log.warning("candidate %s refused: %s", candidate.version, result.reason)
    return Retrained(live.version, candidate.version, result)


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
    from recsys.app.splits import hold_out_recent

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
    seen, relevant, users = _held_out_users(train, held, built, gate_users)
    if len(users) < MIN_GATE_USERS:
        return GateResult(
            False,
            f"refused: only {len(users)} users with held-out interactions after {live.version}'s "
            f"last one (need {MIN_GATE_USERS})",
        )
    try:
        # The CF the candidate's fusion was fitted with (its ALS values): the one it serves is
        # refitted on the held-out interactions too, and would be scored on answers it was
        # trained on.
        params = ALSParams.of(candidate.manifest.get("cf", {}))
        cf = CFModel.train(train, seed=int(built.get("seed", 0)), **params.kwargs())
        ours = recommend_ndcg(candidate, seen, relevant, users, device, cf)
    except Exception as exc:  # any failure to load or rank refuses the candidate
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return GateResult(False, f"refused: the candidate fails to load or rank: {first}")
    theirs = recommend_ndcg(live, seen, relevant, users, device)
    passed = ours >= theirs * (1 - max_drop)
    reason = "pass" if passed else f"refused: more than {max_drop:.1%} below the live version"
    return GateResult(passed, reason, len(users), round(theirs, 4), round(ours, 4), max_drop)


def _held_out_users(
    train: pd.DataFrame, held: pd.DataFrame, built: dict[str, Any], limit: int
) -> tuple[dict[str, list[str]], dict[str, set[str]], list[str]]:
    """(history per user, relevant held-out items per user, the users to rank: a seeded sample
    of at most `limit` with both)."""
    from recsys.app.splits import histories, relevant_items

    least = built.get("relevant_min_weight")
    seen = histories(train)
    relevant = relevant_items(held, -np.inf if least is None else float(least))
    users = sorted(u for u in relevant if seen.get(u))
    random.Random(int(built.get("seed", 0))).shuffle(users)
    return seen, relevant, users[:limit]


def recommend_ndcg(
    bundle: Bundle,
    seen: dict[str, list[str]],
    relevant: dict[str, set[str]],
    users: Sequence[str],
    device: str = "auto",
    cf: Any = None,
) -> float:
    """Mean NDCG@10 of the version's answers to each user's history-only Recommend, ranked as
    serving ranks (`cf`: another CF model in place of the version's)."""
    from gateway.candidates import PoolPolicy
    from ranking_service.ranker import Ranker
    from ranking_service.train import EXAMPLE_HISTORY
    from recsys.app.local import gather_pools, pool_request
    from recsys.core.settings import Settings, default
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
        if cf is not None:
            ranker = ranker.with_cf(cf)
        requests = [
            pool_request(pool, history=seen[u][:EXAMPLE_HISTORY], exclude=seen[u]) for u in users
        ]
        pools = gather_pools(requests, retriever, ranker, policy, desc=f"gate: {bundle.version}")
        values = []
        for user, gathered in zip(users, pools, strict=True):
            context, candidates = gathered.context(), gathered.candidates()
            outcome = ranker.combine(context, candidates, _head_scores(ranker, context, candidates))
            values.append(ndcg_of([s.item_id for s in outcome.scored], relevant[user]))
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


def _head_scores(ranker: Any, context: Any, candidates: Sequence[Any]) -> np.ndarray | None:
    """The cross-encoder's scores for the candidates serving would have it score (NaN elsewhere)."""
    from ranking_service.cross_encoder import context_text

    rows = ranker.rerank_rows(context, candidates) if ranker.scorer is not None else []
    if len(rows) == 0:
        return None
    text = context_text(context)
    ce = np.full(len(candidates), np.nan, np.float32)
    ce[rows] = ranker.scorer.score([(text, candidates[i].text) for i in rows])
    return ce
