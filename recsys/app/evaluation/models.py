"""The trained parts of one bundle, loaded once for offline evaluation (no servers)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from gateway.candidates import CandidatePool, PoolPolicy
from gateway.protocol import RecommendRequest
from ranking_service.cf import ALSParams, CFModel
from ranking_service.content import ItemVectors
from ranking_service.cross_encoder import CrossEncoderScorer, context_text
from ranking_service.item_item import refitted
from ranking_service.ranker import Ranker, Scorer
from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle
from recsys.core.devices import resolve_device
from recsys.core.domain import Candidate, Item, RankContext, Scored
from recsys.core.errors import InvalidInput
from recsys.core.settings import Settings, default
from recsys.offline.local import gather_pools
from retrieval_service.catalog import load_catalog_items
from retrieval_service.retriever import Retriever

Pair = tuple[str, str]
# The dense baselines rerank retrieval's top 50 with a cross-encoder, as every report did
# before the pool grew to 100: the baselines stay comparable and cost half the time.
BASELINE_RERANK = 50


def marked_bundle(root: Path, marks: Sequence[str], built_from: str) -> Bundle | None:
    """ROOT's bundle when its build recorded one of `marks` as its split; None when ROOT has
    none (the protocol builds one there); InvalidInput when it was built otherwise, since it
    may have seen what the protocol holds out (`built_from` says what it should have been)."""
    if not (root / bundle_files.CURRENT).is_file():
        return None
    bundle = Bundle.open(root)
    if bundle.manifest.get("settings", {}).get("split") not in marks:
        raise InvalidInput(
            f"{root}: bundle {bundle.version} was not built {built_from} (it may have seen what "
            "this protocol holds out); pass an empty --bundle ROOT and evaluate builds one"
        )
    return bundle


@dataclass
class EvalModels:
    """Retriever, ranker (CF + fusion), the fine-tuned cross-encoder (the copy serving uses)
    and the base one, and the candidate pool the bundle's fusion was fitted on."""

    bundle: Bundle
    retriever: Retriever
    ranker: Ranker
    tuned: Scorer
    base: Scorer
    pool: int
    policy: PoolPolicy

    @classmethod
    def load(cls, bundle: Bundle, device: str = "auto") -> EvalModels:
        settings = Settings.built_in(bundle=bundle.root, device=device)
        retriever = Retriever.load(bundle, state_dir=None, device=device)
        ranker = Ranker.load(bundle, settings)
        if ranker.content is None:
            # The ablation refits fusion on every feature, also those this bundle's fusion gave
            # no weight (which serving then skips).
            ranker = ranker.with_content(ItemVectors.load(bundle.path))
        # The copy serving uses (int8 where the build validated it).
        tuned = ranker.scorer
        if tuned is None:
            raise InvalidInput(f"{bundle.path}: no cross-encoder to evaluate (built --no-ranker)")
        section = bundle.manifest["cross_encoder"]
        # Both read pairs cut to the length the ranking service uses.
        max_length = int(section["max_length"])
        base = untuned_baseline(Path(section["base"]), device, max_length)
        # Bundles from before the pool was recorded were fitted on serving's default share.
        built = bundle.manifest.get("settings", {})
        pool = int(built.get("candidate_pool", default("default_candidate_pool")))
        share = float(built.get("cf_candidate_share", default("cf_candidate_share")))
        return cls(bundle, retriever, ranker, tuned, base, pool, PoolPolicy(cf_share=share))

    @property
    def seed(self) -> int:
        return int(self.bundle.manifest.get("settings", {}).get("seed", 0))

    @property
    def cf_params(self) -> dict[str, Any]:
        """The bundle's ALS hyper-parameters, as CFModel.train takes them."""
        return ALSParams.of(self.bundle.manifest["cf"]).kwargs()

    def ranker_refitted_on(self, interactions: pd.DataFrame) -> Ranker:
        """The bundle's ranker with CF and its item-to-item model refitted on `interactions`
        (their own hyper-parameters and seed): what serving would be had they seen only those."""
        cf = CFModel.train(interactions, seed=self.seed, **self.cf_params)
        return self.ranker.with_cf(cf, refitted(self.bundle.manifest["cf"], interactions))

    @cached_property
    def items(self) -> list[Item]:
        """The bundle's catalog: what its retrieval serves (evaluation changes nothing online)."""
        return load_catalog_items(self.bundle.file(bundle_files.CATALOG))

    def vector(self, item_id: str) -> np.ndarray | None:
        """The item's vector, read through the catalog backend (FAISS or Milvus)."""
        found, _ = self.retriever.get_items([item_id])
        return found[0][1] if found else None

    def pools(
        self, requests: Sequence[RecommendRequest], desc: str | None, cf_share: float | None = None
    ) -> list[CandidatePool]:
        """What the gateway would gather for each request (`cf_share` 0: retrieval alone)."""
        policy = self.policy if cf_share is None else PoolPolicy(cf_share=cf_share)
        return gather_pools(requests, self.retriever, self.ranker, policy, desc)


@dataclass(frozen=True)
class Reranked:
    """One request's answers from the cross-encoder methods."""

    dense_ce: list[str]  # retrieval's head reranked by the fine-tuned cross-encoder
    dense_ce_base: list[str]  # ... by the untuned one
    full: list[Scored]  # the ranker's whole answer over the pool


def rerank(
    models: EvalModels,
    contexts: Sequence[RankContext],
    dense: Sequence[Sequence[Candidate]],
    pools: Sequence[Sequence[Candidate]],
    desc: str,
    progress: bool,
) -> list[Reranked]:
    """The dense baselines over retrieval's top BASELINE_RERANK and the ranker over `pools`;
    the fine-tuned cross-encoder scores each pair these need once, in large batches."""
    heads = [list(d[:BASELINE_RERANK]) for d in dense]
    union = []
    for context, head, pool in zip(contexts, heads, pools, strict=True):
        ids = {c.item_id for c in head}
        reranked = [pool[i] for i in models.ranker.rerank_rows(context, pool)] if pool else []
        union.append(head + [c for c in reranked if c.item_id not in ids])
    tuned = score_lists(models.tuned, contexts, union, f"{desc}: dense+ce", progress)
    base = score_lists(models.base, contexts, heads, f"{desc}: dense+ce_base", progress)
    out = []
    for context, head, pool, scored, ce, ce_base in zip(
        contexts, heads, pools, union, tuned, base, strict=True
    ):
        ce_of = dict(zip((c.item_id for c in scored), ce.tolist(), strict=True))
        outcome = models.ranker.combine(
            context, pool, np.array([ce_of.get(c.item_id, np.nan) for c in pool])
        )
        out.append(
            Reranked(
                _top(head, np.array([ce_of[c.item_id] for c in head])),
                _top(head, ce_base),
                outcome.scored,
            )
        )
    return out


def _top(candidates: Sequence[Candidate], scores: np.ndarray, k: int = 10) -> list[str]:
    return [candidates[i].item_id for i in np.argsort(-scores, kind="stable")[:k]]


def untuned_baseline(base_dir: Path, device: str, max_length: int) -> Scorer:
    """The same backbone with a fresh (seeded) one-logit head; on a CPU its int8 copy (weights
    only), as the tuned model serves from an int8 copy, so the baseline costs minutes."""
    if resolve_device(device) != "cpu":
        return CrossEncoderScorer.load(base_dir, device, max_length)
    from ranking_service.quantized import Int8CrossEncoderScorer, export_int8

    out = Path(tempfile.mkdtemp(prefix="ce-base-int8-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    export_int8(base_dir, out, max_length)
    return Int8CrossEncoderScorer.load(out, max_length)


def score_lists(
    scorer: Scorer,
    contexts: Sequence[RankContext],
    pools: Sequence[Sequence[Candidate]],
    desc: str = "cross-encoder",
    progress: bool = True,
) -> list[np.ndarray]:
    """Cross-encoder scores for many (context, pool) lists in large batches; one array per list."""
    pairs: list[Pair] = []
    for context, pool in zip(contexts, pools, strict=True):
        text = context_text(context)
        pairs.extend((text, c.text) for c in pool)
    chunk = 4096
    parts = [
        scorer.score(pairs[i : i + chunk], batch_size=128)
        for i in tqdm(range(0, len(pairs), chunk), desc=desc, unit="chunk", disable=not progress)
    ]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    out, offset = [], 0
    for pool in pools:
        out.append(flat[offset : offset + len(pool)])
        offset += len(pool)
    return out
