"""Golden figures of the ranking algorithm, frozen before it was consolidated into one plan.

Over the sample bundle the tests build once, for a fixed set of requests: the top 10 and fused
scores of `Ranker.rank` (as built, and with the cross-encoder's second pass on for every kind),
of the ablation's `full` variant, the two passes the build's fusion fitting chose on its
held-out lists, and the retrain gate's NDCG@10. Any change to how candidates are ranked, fused
or fitted changes them. A deliberate change rewrites the file
(`RECSYS_UPDATE_GOLDEN=1 pytest tests/test_golden.py`) and says why in its commit.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.candidates import CandidatePool, PoolPolicy
from ranking_service.cf import ALSParams, CFModel
from ranking_service.item_item import refitted
from ranking_service.ranker import Ranker
from recsys.app import build
from recsys.app.evaluation import ablation
from recsys.app.evaluation.models import EvalModels
from recsys.app.sample import sample_paths
from recsys.core.bundle import Bundle
from recsys.core.settings import Settings
from recsys.offline.gate import recommend_ndcg
from recsys.offline.heldout import HeldOut
from recsys.offline.local import gather_pools, pool_request
from recsys.offline.splits import histories, hold_out_recent
from retrieval_service.retriever import Retriever

GOLDEN = Path(__file__).parent / "golden" / "ranking.json"
UPDATE = os.environ.get("RECSYS_UPDATE_GOLDEN") == "1"
# Scores are compared to this relative tolerance (and absolutely to ATOL near 0): the figures
# are exact on one machine, and float sums may differ in the last bits on another CPU.
RTOL, ATOL = 1e-4, 1e-5
QUERIES = ("wireless headphones", "4k monitor", "espresso machine for home", "running shoes")
HISTORY_USERS = ("U0001", "U0002", "U0003", "U0004", "U0005")


@dataclass(frozen=True)
class Loaded:
    bundle: Bundle
    retriever: Retriever
    served: Ranker  # as the bundle's plan says, the fine-tuned fp32 model scoring
    rerank_all: Ranker  # with the cross-encoder's second pass for every kind of request
    inputs: build.BuildInputs


@pytest.fixture(scope="module")
def loaded(sample_bundle_root: Path) -> Iterator[Loaded]:
    bundle = Bundle.open(sample_bundle_root)
    settings = Settings.built_in(bundle=sample_bundle_root, device="cpu")
    retriever = Retriever.load(bundle, state_dir=None, device="cpu")
    # The fine-tuned model itself, not the copy the build chose: that choice weighs measured
    # speeds, and the int8 copies' kernels differ from one CPU's instruction set to another's.
    settings = settings.model_copy(update={"cross_encoder_copy": "fp32"})
    served = Ranker.load(bundle, settings)
    rerank_all = Ranker.load(bundle, settings.model_copy(update={"rerank_kinds": "all"}))
    built = bundle.manifest["settings"]
    catalog, interactions = sample_paths()
    options = build.BuildOptions(
        catalog=catalog,
        interactions=interactions,
        out=sample_bundle_root,
        fusion_lists=int(built["fusion_lists"]),
        seed=int(built["seed"]),
    )
    try:
        yield Loaded(bundle, retriever, served, rerank_all, build.load_inputs(options))
    finally:
        retriever.close()


def _requests(loaded: Loaded) -> list[dict[str, Any]]:
    """The fixed requests: searches, histories (each user's 5 most recent items), a search
    with a history, and users alone."""
    seen = histories(loaded.inputs.interactions)
    out: list[dict[str, Any]] = [{"query": q} for q in QUERIES]
    out += [{"history": seen[u][:5]} for u in HISTORY_USERS]
    out.append({"query": QUERIES[0], "history": seen[HISTORY_USERS[0]][:5]})
    out += [{"user_id": u} for u in HISTORY_USERS[:2]]
    return out


def _pools(loaded: Loaded, ranker: Ranker) -> list[CandidatePool]:
    built = loaded.bundle.manifest["settings"]
    policy = PoolPolicy(cf_share=float(built["cf_candidate_share"]))
    requests = [
        replace(
            pool_request(
                int(built["candidate_pool"]),
                query=r.get("query", ""),
                history=r.get("history", ()),
                exclude=r.get("history", ()),
            ),
            user_id=r.get("user_id", ""),
        )
        for r in _requests(loaded)
    ]
    return gather_pools(requests, loaded.retriever, ranker, policy)


def _served(ranker: Ranker, pools: Sequence[CandidatePool]) -> list[dict[str, Any]]:
    """Ranker.rank's answer to each pool, as serving calls it (batcher on an event loop)."""

    async def rank_all() -> list[dict[str, Any]]:
        ranker.start()
        try:
            out = []
            for pool in pools:
                outcome = await ranker.rank(pool.context(), pool.candidates())
                out.append(
                    {
                        "top": [[s.item_id, s.scores.fused] for s in outcome.scored[:10]],
                        # The copy that scored (the version's name is the build's time).
                        "cross_encoder": outcome.versions.get("cross_encoder", "").split("/")[-1],
                        "cf_folded_in": outcome.cf_folded_in,
                    }
                )
            return out
        finally:
            await ranker.close()

    return asyncio.run(rank_all())


def _ablation_full(loaded: Loaded, ranker: Ranker, pools: Sequence[CandidatePool]) -> list[Any]:
    """The ablation's `full` variant over the history requests' pools."""
    assert ranker.scorer is not None
    built = loaded.bundle.manifest["settings"]
    models = EvalModels(
        loaded.bundle,
        loaded.retriever,
        ranker,
        ranker.scorer,
        ranker.scorer,
        int(built["candidate_pool"]),
        PoolPolicy(cf_share=float(built["cf_candidate_share"])),
    )
    full = next(v for v in ablation.VARIANTS if v.name == "full")
    with_history = [p for p in pools if p.context().history and not p.context().query]
    return ablation.rank_top(models, ranker, with_history, full, progress=False)


def _fitting(loaded: Loaded) -> dict[str, Any]:
    """The two passes the build's fusion fitting chose on its held-out lists, as its manifest
    records them (the sweep's NDCG@10 at each depth included)."""
    fusion = loaded.bundle.manifest["fusion"]
    return {kind: _without_timings(fusion[kind]) for kind in ("history", "query")}


def _without_timings(value: Any) -> Any:
    """The record without what depends on this machine's speed."""
    timed = {"ms_per_request", "cross_encoder_pairs_per_s"}
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in timed}
    if isinstance(value, list | tuple):
        return [_without_timings(v) for v in value]
    return value


def _gate(loaded: Loaded) -> dict[str, Any]:
    """The retrain gate's scoring of the bundle on the sample's most recent interactions, with
    the bundle's CF and with CF and item-to-item refitted on the rest (as the gate scores a
    candidate)."""
    built = loaded.bundle.manifest["settings"]
    train, held = hold_out_recent(loaded.inputs.interactions, 3)
    least = built.get("relevant_min_weight")
    held_out = HeldOut.of(train, held, None if least is None else float(least))
    users = held_out.users(seed=int(built.get("seed", 0)), limit=60)
    section = loaded.bundle.manifest["cf"]
    cf = CFModel.train(train, seed=0, **ALSParams.of(section).kwargs())
    refit = (cf, refitted(section, train))
    return {
        "users": len(users),
        "ndcg": recommend_ndcg(loaded.bundle, held_out, users, "cpu"),
        "ndcg_refitted_cf": recommend_ndcg(loaded.bundle, held_out, users, "cpu", refit),
    }


def _figures(loaded: Loaded) -> dict[str, Any]:
    served_pools = _pools(loaded, loaded.served)
    all_pools = _pools(loaded, loaded.rerank_all)
    return {
        "requests": _requests(loaded),
        "rank": _served(loaded.served, served_pools),
        "rank_rerank_all": _served(loaded.rerank_all, all_pools),
        "ablation_full": _ablation_full(loaded, loaded.served, served_pools),
        "ablation_full_rerank_all": _ablation_full(loaded, loaded.rerank_all, all_pools),
        "fitting": _fitting(loaded),
        "gate": _gate(loaded),
    }


def _match(got: Any, want: Any, where: str) -> list[str]:
    """Where `got` differs from `want`: floats beyond the tolerance, anything else at all."""
    if isinstance(want, dict) and isinstance(got, dict):
        if set(got) != set(want):
            return [f"{where}: keys {sorted(got)} != {sorted(want)}"]
        return [d for k in want for d in _match(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list | tuple):
        if len(got) != len(want):
            return [f"{where}: {len(got)} entries != {len(want)}"]
        return [
            d
            for i, (g, w) in enumerate(zip(got, want, strict=True))
            for d in _match(g, w, f"{where}[{i}]")
        ]
    if isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool):
        close = math.isclose(float(got), want, rel_tol=RTOL, abs_tol=ATOL)
        return [] if close else [f"{where}: {got!r} != {want!r}"]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars as Python numbers."""
    return json.loads(
        json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))
    )


def test_golden_figures(loaded: Loaded) -> None:
    got = _plain(_figures(loaded))
    if UPDATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    # The cross-encoder's second pass really ran somewhere, or the golden figures guard less.
    assert any(r["cross_encoder"] not in ("", "skipped") for r in want["rank_rerank_all"])
    differences = _match(got, want, "golden")
    assert not differences, "\n".join(differences[:20])
