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
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from recsys.app.build import BuildInputs, BuildOptions, build_bundle, load_inputs
from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle, clear_rejection, publish, reject
from recsys.offline.gate import GATE_USERS, MAX_DROP, GateResult, gate

log = logging.getLogger(__name__)

EXIT_SWITCHED = 0
EXIT_REFUSED = 3  # the gate kept the candidate aside (1 stays Python's crash code)
# Fine-tuning steps when continuing from the live cross-encoder: a third of a build's.
RETRAIN_RANKER_STEPS = 50

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
