"""Which copy of the fine-tuned cross-encoder serves (ranking_service.copies): the build
compares them on held-out lists and records its choice as the manifest's
`cross_encoder.serving_copy`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ranking_service.copies import DIRS, load_copy
from ranking_service.cross_encoder import CrossEncoderScorer
from ranking_service.fusion import TwoPassFusion
from ranking_service.fusion_fit import FusionList, PairScorer, two_pass_ndcg
from recsys.core import bundle as bundle_files

log = logging.getLogger(__name__)

INT8_TOLERANCE = 0.01  # an int8 copy serves only within 1% of its fp32 model's NDCG@10
STUDENT_KEEPS = 0.97  # the student serves only with at least 97% of the teacher's NDCG@10
STUDENT_MIN_SPEARMAN = 0.9  # ... and its held-out scores' rank correlation with the teacher's


def choose_copy(
    stage: Path,
    max_length: int,
    fp32: PairScorer,
    fitted: Mapping[str, TwoPassFusion],
    held_out: Mapping[str, Sequence[FusionList]],
    student_agreement: float | None,
) -> dict[str, Any]:
    """Compares every copy under the bundle directory `stage` on the held-out lists of each
    request kind (the two passes as fitted, each copy reranking the head) and picks the fastest
    that keeps the teacher's NDCG@10 for every kind: int8 within INT8_TOLERANCE of its fp32
    model, the student within STUDENT_KEEPS (and with a held-out Spearman of at least
    STUDENT_MIN_SPEARMAN with the teacher). `fp32` scores with the fine-tuned model itself."""
    copies: dict[str, PairScorer] = {"fp32": fp32}
    for name in ("int8", "student", "student_int8"):
        if (stage / DIRS[name]).is_dir():
            copies[name] = load_copy(name, stage, max_length, "cpu").score
    parity: dict[str, Any] = {}
    for kind, two_pass in fitted.items():
        lists = held_out[kind]
        if two_pass.second is None or not lists:
            continue
        rows = {}
        for name, score in copies.items():
            value, pairs_per_s = two_pass_ndcg(two_pass, lists, score)
            rows[name] = {"ndcg@10": round(value, 4), "pairs_per_s": round(pairs_per_s, 1)}
        # fp32 answered from memory: its speed is the sweep's, timed afresh where none ran.
        rows["fp32"]["pairs_per_s"] = two_pass.fitted_on.get(
            "cross_encoder_pairs_per_s"
        ) or _fp32_speed(stage, max_length, lists)
        parity[kind] = rows
    # Two-pass NDCG moves little with the head's order, so the student must also agree with
    # the teacher on held-out training contexts before it may serve.
    follows = student_agreement is not None and student_agreement >= STUDENT_MIN_SPEARMAN
    allowed = [
        name
        for name in copies
        if parity and _keeps(name, parity) and (follows or not name.startswith("student"))
    ]
    speed = {name: min(rows[name]["pairs_per_s"] for rows in parity.values()) for name in allowed}
    serving = max(allowed, key=lambda name: speed[name]) if allowed else "fp32"
    log.info(
        "cross-encoder copies on held-out lists: %s -> serving %s",
        "; ".join(
            f"{kind}: "
            + ", ".join(
                f"{n} {r['ndcg@10']:.4f} at {r['pairs_per_s']:.0f} pairs/s" for n, r in rows.items()
            )
            for kind, rows in parity.items()
        )
        or "no held-out list to compare on",
        serving,
    )
    return {"parity": parity, "serving_copy": serving}


def _fp32_speed(
    stage: Path, max_length: int, lists: Sequence[FusionList], pairs: int = 200
) -> float:
    """Pairs/s of the fine-tuned model on up to `pairs` of the held-out lists' pairs."""
    sample = [(f.context, t) for f in lists for t in f.texts][:pairs]
    scorer = CrossEncoderScorer.load(stage / bundle_files.CROSS_ENCODER_DIR, "cpu", max_length)
    started = time.perf_counter()
    scorer.score(sample)
    return round(len(sample) / max(time.perf_counter() - started, 1e-9), 1)


def _keeps(name: str, parity: dict[str, Any]) -> bool:
    """Whether copy `name` keeps enough of the teacher's NDCG@10 on every kind."""
    for rows in parity.values():
        teacher = rows["fp32"]["ndcg@10"]
        if name in ("int8", "student_int8"):
            model = rows["fp32" if name == "int8" else "student"]["ndcg@10"]
            if rows[name]["ndcg@10"] < (1 - INT8_TOLERANCE) * model:
                return False
        if name.startswith("student") and rows[name]["ndcg@10"] < STUDENT_KEEPS * teacher:
            return False
    return True
