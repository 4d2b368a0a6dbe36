"""The cross-encoder part of a build: fine-tuning on the training interactions, then the
cheaper copies (a distilled student, int8 copies of both) from training-side pairs."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from recsys.core import bundle as bundle_files
from recsys.offline.splits import histories

if TYPE_CHECKING:  # the models load torch: imported where a build runs, not with the CLI
    from recsys.app.build import BuildInputs, BuildOptions
    from recsys.offline.fitting import Queries
    from recsys.offline.local import Pools


def train_ranker(
    options: BuildOptions,
    inputs: BuildInputs,
    pools: Pools,
    encoder_dir: Path,
    stage: Path,
    train_queries: Queries,
) -> dict[str, Any]:
    """The cross-encoder fine-tuned on the training interactions and queries, negatives from
    the pools serving would gather; its manifest section."""
    from ranking_service.train import Example, train_cross_encoder

    def negatives(examples: Sequence[Example]) -> list[list[str]]:
        """The pool serving would rank for each example's query and history."""
        gathered = pools.gather([pools.request(e.query, e.history) for e in examples])
        return [[p.item_id for p in pool.items] for pool in gathered]

    assert options.ranker is not None
    config = replace(options.ranker, device=options.device, seed=options.seed)
    live = options.warm_from
    warm = None
    if live is not None and live.manifest.get("cross_encoder"):
        warm = live.file(bundle_files.CROSS_ENCODER_DIR)
    return train_cross_encoder(
        base_dir=encoder_dir,
        catalog=inputs.catalog,
        interactions=inputs.interactions,
        negatives=negatives,
        out_dir=stage / bundle_files.CROSS_ENCODER_DIR,
        config=config,
        train_queries=train_queries,
        warm_start=warm,
    )


TRAIN_SIDE_CONTEXTS = 300  # at most, training contexts whose pools the student learns from
PAIRS_PER_CONTEXT = 30  # of each pool, in the order serving gathers it


def train_side_contexts(options: BuildOptions) -> int:
    """Contexts enough for one pass of the student's training (or int8 calibration alone)."""
    from ranking_service.quantized import CALIBRATION_PAIRS

    student = options.student
    pairs = CALIBRATION_PAIRS if student is None else student.steps * student.batch_size
    return min(TRAIN_SIDE_CONTEXTS, max(1, -(-pairs // PAIRS_PER_CONTEXT)))


def train_side_pairs(
    options: BuildOptions,
    inputs: BuildInputs,
    pools: Pools,
    train_queries: Queries,
    contexts: int,
) -> list[tuple[str, str]]:
    """Serving-like (context, candidate) pairs from training data only (never validation):
    about `contexts` contexts, three in four users' histories cut at a random earlier point and
    one in four training queries, each with the first PAIRS_PER_CONTEXT candidates of the pool
    serving would gather."""
    from ranking_service.cross_encoder import context_text
    from ranking_service.train import EXAMPLE_HISTORY

    rng = random.Random(options.seed)
    seen = histories(inputs.interactions)
    users = sorted(u for u, items in seen.items() if len(items) >= 2)
    requests = []
    for user in rng.sample(users, min(contexts - contexts // 4, len(users))):
        earlier = seen[user][rng.randrange(1, len(seen[user])) :]
        requests.append(pools.request(history=earlier[:EXAMPLE_HISTORY], exclude=earlier))
    texts = sorted({*logged_queries(inputs.interactions), *(q for q, _ in train_queries)})
    for query in rng.sample(texts, min(max(contexts // 4, 1), len(texts))):
        requests.append(pools.request(query=query))
    pairs: list[tuple[str, str]] = []
    for pool in pools.gather(requests, desc="student: training contexts"):
        text = context_text(pool.context())
        if text:
            pairs.extend((text, c.text) for c in pool.candidates()[:PAIRS_PER_CONTEXT])
    return pairs


def logged_queries(interactions: pd.DataFrame) -> set[str]:
    """The distinct non-empty query texts of an interaction log."""
    logged = interactions.get("query", pd.Series(dtype=str)).astype(str).str.strip()
    return set(logged[logged != ""])


def cheaper_copies(
    options: BuildOptions, stage: Path, encoder_dir: Path, pairs: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """The student distilled from the fine-tuned cross-encoder, and int8 copies of both, all
    from training-side pairs (int8 calibration only reads them for activation ranges)."""
    from ranking_service.copies import DIRS
    from ranking_service.distill import distill
    from ranking_service.quantized import export_int8

    assert options.ranker is not None
    max_length = options.ranker.max_length
    teacher = stage / bundle_files.CROSS_ENCODER_DIR
    out: dict[str, Any] = {}
    out["int8"] = export_int8(teacher, stage / DIRS["int8"], max_length, calibration_pairs=pairs)
    if options.student is not None:
        config = replace(
            options.student, device=options.device, seed=options.seed, max_length=max_length
        )
        student = stage / DIRS["student"]
        out["student"] = distill(teacher, encoder_dir, pairs, student, config)
        out["student_int8"] = export_int8(
            student, stage / DIRS["student_int8"], max_length, calibration_pairs=pairs
        )
    return out
