"""Fine-tunes the cross-encoder on (context, item) pairs mined from interactions and queries.

Uses sentence-transformers' CrossEncoder training stack: a listwise ranking loss (LambdaLoss,
NDCG-targeted) over lists of one positive and hard negatives mined from the retrieval index, with
validation-based checkpoint selection and early stopping. Lists (not in-batch negatives) keep the
cost at (1 + negatives) pairs per context, which matters at ~50 training pairs/s on a CPU.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ranking_service.cross_encoder import build_context
from ranking_service.fusion import LogisticFusion, features
from recsys.devices import resolve_device
from recsys.domain import item_text

log = logging.getLogger(__name__)

# Context texts → for each, the item ids of its nearest items in the retrieval index.
NegativesFn = Callable[[Sequence[str], int], list[list[str]]]
NEGATIVE_DEPTH = 30  # hard negatives are sampled from this many retrieved items
CHUNK = 256  # contexts per retrieval call: bounds memory on large logs


@dataclass(frozen=True)
class RankerTrainConfig:
    steps: int = 150
    batch_size: int = 16
    negatives_per_positive: int = 3
    learning_rate: float = 5e-5
    max_length: int = 128
    validation_users: int = 100
    validation_candidates: int = 10  # the positive among retrieved negatives
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class Example:
    """One context with its positive item and the items never to use as its negatives."""

    context: str
    positive: str
    known: frozenset[str]


def mine_examples(
    catalog: pd.DataFrame,
    interactions: pd.DataFrame,
    validation_users: int,
    rng: random.Random,
) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples: each interaction after a user's first, or with a query.

    Validation is the last interaction of a random subset of users, never trained on.
    """
    text = _texts(catalog)
    ordered = interactions.sort_values(["user_id", "timestamp"], kind="stable")
    per_user: dict[str, list[Example]] = {}
    for user, group in ordered.groupby("user_id", sort=True):
        history: list[str] = []
        examples = []
        for item, query in zip(group["item_id"], group["query"], strict=True):
            if query or history:
                recent = [text[i] for i in history[:5]]
                examples.append(
                    Example(build_context(str(query), recent), item, frozenset(history))
                )
            history.insert(0, item)
        per_user[str(user)] = examples
    users = sorted(u for u, ex in per_user.items() if len(ex) >= 2)
    held = set(rng.sample(users, min(validation_users, len(users))))
    train = [e for u, ex in per_user.items() for e in (ex[:-1] if u in held else ex)]
    validation = [per_user[u][-1] for u in sorted(held)]
    return train, validation


def query_examples(
    train_queries: Sequence[tuple[str, Sequence[str]]], per_query: int, rng: random.Random
) -> list[Example]:
    """Search contexts: each (train-split) query with some of its relevant items as positives."""
    out = []
    for query, relevant in train_queries:
        items = list(relevant)
        for item in rng.sample(items, min(per_query, len(items))):
            out.append(Example(query, item, frozenset(items)))
    return out


def _texts(catalog: pd.DataFrame) -> dict[str, str]:
    return {
        str(r.item_id): item_text(str(r.title), str(r.category), str(r.description))
        for r in catalog.itertuples(index=False)
    }


def hard_negatives(
    examples: Sequence[Example], negatives: NegativesFn, count: int, rng: random.Random
) -> list[list[str]]:
    """`count` retrieved items per example that are neither its positive nor already known."""
    out: list[list[str]] = []
    for start in range(0, len(examples), CHUNK):
        chunk = examples[start : start + CHUNK]
        retrieved = negatives([e.context for e in chunk], NEGATIVE_DEPTH + 1)
        for example, items in zip(chunk, retrieved, strict=True):
            pool = [i for i in items if i != example.positive and i not in example.known]
            out.append(rng.sample(pool, min(count, len(pool))))
    return out


def train_cross_encoder(
    base_dir: Path,
    catalog: pd.DataFrame,
    interactions: pd.DataFrame,
    negatives: NegativesFn,
    out_dir: Path,
    config: RankerTrainConfig,
    train_queries: Sequence[tuple[str, Sequence[str]]] = (),
) -> dict[str, Any]:
    """Fine-tunes from `base_dir`, saves the best checkpoint to out_dir, returns the manifest part."""
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator
    from sentence_transformers.cross_encoder.losses import LambdaLoss
    from transformers import EarlyStoppingCallback

    started = time.perf_counter()
    rng = random.Random(config.seed)
    device = resolve_device(config.device)
    text = _texts(catalog)
    train, validation = mine_examples(catalog, interactions, config.validation_users, rng)
    train += query_examples(train_queries, per_query=3, rng=rng)
    # Only as many examples as the steps will see: mining negatives for the rest is wasted work.
    budget = config.steps * config.batch_size
    train = rng.sample(train, min(budget, len(train)))
    log.info("cross-encoder: %d training contexts, %d validation", len(train), len(validation))
    train_negs = hard_negatives(train, negatives, config.negatives_per_positive, rng)
    val_negs = hard_negatives(validation, negatives, config.validation_candidates - 1, rng)
    keep = [k for k, n in enumerate(train_negs) if len(n) == config.negatives_per_positive]
    labels = [1] + [0] * config.negatives_per_positive
    dataset = Dataset.from_dict(
        {
            "query": [train[k].context for k in keep],
            "docs": [[text[train[k].positive], *(text[i] for i in train_negs[k])] for k in keep],
            "labels": [labels for _ in keep],
        }
    )
    evaluator = CrossEncoderRerankingEvaluator(
        samples=[
            {
                "query": e.context,
                "positive": [text[e.positive]],
                "negative": [text[i] for i in negs],
            }
            for e, negs in zip(validation, val_negs, strict=True)
        ],
        at_k=10,
        name="validation",
        batch_size=64,
        write_csv=False,
    )

    torch.manual_seed(config.seed)
    model = CrossEncoder(
        str(base_dir),
        num_labels=1,
        max_length=config.max_length,
        device=device,
        local_files_only=True,
    )
    before = _validation_scores(evaluator(model))
    log.info("cross-encoder validation before fine-tuning: %s", before)
    eval_every = max(config.steps // 4, 1)
    with tempfile.TemporaryDirectory(prefix="ce-train-") as work:
        args = CrossEncoderTrainingArguments(
            output_dir=work,
            max_steps=config.steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            warmup_ratio=0.1,
            eval_strategy="steps",
            eval_steps=eval_every,
            save_strategy="steps",
            save_steps=eval_every,
            save_total_limit=2,
            load_best_model_at_end=True,
            metric_for_best_model="eval_validation_ndcg@10",
            greater_is_better=True,
            logging_steps=eval_every,
            report_to="none",
            dataloader_num_workers=0,
            seed=config.seed,
            use_cpu=device == "cpu",
            bf16=device == "cuda" and torch.cuda.is_bf16_supported(),
        )
        trainer = CrossEncoderTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            loss=LambdaLoss(model),
            evaluator=evaluator,
            callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],
        )
        trainer.train()
        steps_done = trainer.state.global_step
    after = _validation_scores(evaluator(model))
    log.info("cross-encoder validation after fine-tuning: %s", after)
    model.save_pretrained(str(out_dir))
    return {
        "base": str(base_dir),
        "steps": steps_done,
        "max_steps": config.steps,
        "batch_size": config.batch_size,
        "max_length": config.max_length,
        "loss": "LambdaLoss over [positive + hard negatives from retrieval]",
        "pairs": len(keep) * (1 + config.negatives_per_positive),
        "contexts": len(keep),
        "validation": {"before": before, "after": after, "examples": len(validation)},
        "train_seconds": round(time.perf_counter() - started, 1),
    }


def _validation_scores(metrics: dict[str, float]) -> dict[str, float]:
    return {
        "ndcg@10": round(float(metrics["validation_ndcg@10"]), 4),
        "mrr@10": round(float(metrics["validation_mrr@10"]), 4),
    }


@dataclass(frozen=True)
class FusionList:
    """One validation request: stage scores of its candidates and which ones were relevant."""

    ce: np.ndarray | None
    cf: np.ndarray
    retrieval: np.ndarray
    labels: np.ndarray


def fit_fusion(lists: Sequence[FusionList], **meta: Any) -> LogisticFusion:
    """Fits the learned fusion on validation lists (features are standardised per list)."""
    x = np.vstack([features(f.ce, f.cf, f.retrieval) for f in lists])
    y = np.concatenate([f.labels for f in lists]).astype(np.float64)
    return LogisticFusion.fit(x, y, lists=len(lists), positives=int(y.sum()), **meta)
