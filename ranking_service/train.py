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
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ranking_service.cross_encoder import DEFAULT_MAX_LENGTH, HISTORY_IN_CONTEXT, build_context
from ranking_service.train_plan import VALIDATIONS, autocast, native_bf16, plan_steps, step_seconds
from recsys.core.devices import resolve_device
from recsys.core.domain import item_text
from recsys.core.errors import InvalidInput
from recsys.core.settings import default

log = logging.getLogger(__name__)

# Examples → for each, the candidate pool serving would rank for it (item ids).
NegativesFn = Callable[[Sequence["Example"]], list[list[str]]]
# Most recent history items an example carries: as many as a request may send.
EXAMPLE_HISTORY = default("max_history_items")
CHUNK = 256  # contexts per candidate-gathering call: bounds memory on large logs


@dataclass(frozen=True)
class RankerTrainConfig:
    """Fine-tuning knobs; `steps` counts optimizer steps of `batch_size` lists (1 + negatives)."""

    steps: int = 150
    batch_size: int = 16
    negatives_per_positive: int = 3
    learning_rate: float = 5e-5
    max_length: int = DEFAULT_MAX_LENGTH
    validation_users: int = 100
    validation_candidates: int = 20  # the positive among retrieved hard negatives
    query_share: float = 0.5  # of training contexts, when there are search queries to train on
    # Wall-clock budget of fine-tuning, validation passes included: the steps are planned to
    # fit it at the speed measured on this machine, `steps` at most (None: `steps`, however
    # long they take).
    seconds: float | None = 300.0
    # Mixed bf16 precision: None where the hardware computes bf16 natively (native_bf16). A
    # build that must give the same model on any CPU pins it.
    bf16: bool | None = None
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        minimums = {
            "steps": 1,
            "batch_size": 1,
            "negatives_per_positive": 1,
            "max_length": 8,
            "validation_users": 0,
            "validation_candidates": 2,
        }
        for name, least in minimums.items():
            if getattr(self, name) < least:
                raise InvalidInput(f"ranker {name}={getattr(self, name)}: must be >= {least}")
        if not 0.0 <= self.query_share <= 1.0:
            raise InvalidInput(f"ranker query_share={self.query_share}: must be within [0, 1]")
        if self.seconds is not None and not self.seconds > 0:
            raise InvalidInput(f"ranker seconds={self.seconds}: must be > 0")


@dataclass(frozen=True)
class Example:
    """One context with its positive item and the items never to use as its negatives."""

    context: str
    positive: str
    known: frozenset[str]
    history: tuple[str, ...] = ()  # item ids, most recent first (empty for a search)
    query: str = ""  # the search text, when the interaction had one


def mine_examples(
    catalog: pd.DataFrame,
    interactions: pd.DataFrame,
    validation_users: int,
    rng: random.Random,
) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples: each interaction after a user's first, or with a query.

    Validation is the last example of a random subset of users, never trained on. Items missing
    from the catalog have no text: they are neither positives nor part of a context.
    """
    text = item_texts(catalog)
    ordered = interactions.sort_values(["user_id", "timestamp"], kind="stable")
    per_user: dict[str, list[Example]] = {}
    for user, group in ordered.groupby("user_id", sort=True):
        items = [str(i) for i in group["item_id"] if str(i) in text]
        # Anything the user ever touched is no negative for them, earlier or later.
        known = frozenset(items)
        history: list[str] = []  # most recent first
        examples = []
        for item, query in zip(group["item_id"], group["query"], strict=True):
            item, query = str(item), str(query).strip()
            if item not in text:
                continue
            if query or history:
                recent = [text[i] for i in history[:HISTORY_IN_CONTEXT]]
                examples.append(
                    Example(
                        build_context(query, recent),
                        item,
                        known,
                        tuple(history[:EXAMPLE_HISTORY]),
                        query,
                    )
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
            out.append(Example(query, item, frozenset(items), query=query))
    return out


def training_sample(
    history_examples: list[Example],
    train_queries: Sequence[tuple[str, Sequence[str]]],
    config: RankerTrainConfig,
    text: dict[str, str],
    rng: random.Random,
) -> list[Example]:
    """As many contexts as the steps will see, `query_share` of them search queries.

    Interactions outnumber queries by far: sampled together, queries would all but vanish and
    the model would never learn to rank for a search. Mining negatives only for what the
    steps will see also saves retrieval work.
    """
    budget = config.steps * config.batch_size
    queries: list[Example] = []
    if train_queries:
        per_query = -(-round(budget * config.query_share) // len(train_queries))  # ceiling
        queries = [e for e in query_examples(train_queries, per_query, rng) if e.positive in text]
        queries = rng.sample(queries, min(len(queries), round(budget * config.query_share)))
    rest = budget - len(queries)
    return queries + rng.sample(history_examples, min(rest, len(history_examples)))


def item_texts(catalog: pd.DataFrame) -> dict[str, str]:
    """Item id → the text the cross-encoder reads for it."""
    return {
        str(r.item_id): item_text(str(r.title), str(r.category), str(r.description))
        for r in catalog.itertuples(index=False)
    }


def hard_negatives(
    examples: Sequence[Example],
    negatives: NegativesFn,
    count: int,
    rng: random.Random,
    allowed: Container[str],
) -> list[list[str]]:
    """`count` of the proposed `allowed` items per example, neither its positive nor known.

    `negatives` proposes the pool serving would rank for the example, so the model learns to
    tell the right item from exactly the items it will be shown next to.
    """
    out: list[list[str]] = []
    # Chunks bound what the caller's candidate gathering holds at once on a large log.
    for start in range(0, len(examples), CHUNK):
        chunk = examples[start : start + CHUNK]
        retrieved = negatives(chunk)
        for example, items in zip(chunk, retrieved, strict=True):
            pool = [
                i
                for i in items
                if i != example.positive and i not in example.known and i in allowed
            ]
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
    warm_start: Path | None = None,
) -> dict[str, Any]:
    """Fine-tunes from `base_dir` (or from `warm_start`, a cross-encoder fine-tuned earlier on
    that base), saves the best checkpoint to out_dir, returns the manifest part."""
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer
    from sentence_transformers.cross_encoder.losses import LambdaLoss
    from transformers import EarlyStoppingCallback, PrinterCallback

    started = time.perf_counter()
    rng = random.Random(config.seed)
    device = resolve_device(config.device)
    text = item_texts(catalog)
    train, validation = mine_examples(catalog, interactions, config.validation_users, rng)
    train = training_sample(train, train_queries, config, text, rng)
    train_negs = hard_negatives(train, negatives, config.negatives_per_positive, rng, text)
    val_negs = hard_negatives(validation, negatives, config.validation_candidates - 1, rng, text)
    # LambdaLoss needs lists of one length: contexts short of hard negatives are left out.
    keep = [k for k, n in enumerate(train_negs) if len(n) == config.negatives_per_positive]
    if not keep:
        raise InvalidInput(
            "cross-encoder training: no (context, item) pairs with hard negatives could be mined "
            "(need users with 2+ interactions or queries, and a catalog larger than a user's history)"
        )
    dataset = _train_dataset([train[k] for k in keep], [train_negs[k] for k in keep], text)
    bf16 = native_bf16(device) if config.bf16 is None else config.bf16
    evaluator = _evaluator(validation, val_negs, text, device, bf16) if validation else None
    log.info("cross-encoder: %d training contexts, %d validation", len(keep), len(validation))

    torch.manual_seed(config.seed)  # the fresh 1-logit head, so "before" is reproducible
    start = base_dir if warm_start is None else warm_start
    log.info("cross-encoder: fine-tuning from %s", start)
    model = CrossEncoder(
        str(start),
        num_labels=1,
        max_length=config.max_length,
        device=device,
        local_files_only=True,
    )
    t0 = time.perf_counter()
    before = _validation_scores(evaluator(model)) if evaluator else None
    validation_seconds = time.perf_counter() - t0 if evaluator else 0.0
    log.info("cross-encoder validation before fine-tuning: %s", before)
    loss = LambdaLoss(model)
    plan = plan_steps(
        config,
        spent=time.perf_counter() - started,
        validation_seconds=validation_seconds,
        step_seconds=None
        if config.seconds is None
        else step_seconds(loss, dataset, config.batch_size, device, bf16),
    )
    log.info("cross-encoder: %s", plan.describe())
    with tempfile.TemporaryDirectory(prefix="ce-train-") as work:
        trainer = CrossEncoderTrainer(
            model=model,
            args=_training_args(
                replace(config, steps=plan.steps),
                device,
                Path(work),
                evaluate=evaluator is not None,
                bf16=bf16,
            ),
            train_dataset=dataset,
            loss=loss,
            evaluator=evaluator,
            callbacks=[
                StepProgress(),
                *([EarlyStoppingCallback(early_stopping_patience=2)] if evaluator else []),
            ],
        )
        # With disable_tqdm the Trainer prints each metrics dict instead: StepProgress shows them.
        trainer.remove_callback(PrinterCallback)
        trainer.train()  # with validation, ends holding the best checkpoint
        steps_done = trainer.state.global_step
        after = _best_validation(trainer.state.log_history) if evaluator else None
    log.info("cross-encoder validation after fine-tuning: %s", after)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    return {
        "base": str(base_dir),
        # None: from the base; else the earlier fine-tuned model this one continued from.
        "warm_start": None if warm_start is None else str(warm_start),
        "steps": steps_done,
        "max_steps": config.steps,
        "plan": plan.record(),
        "precision": "bf16 mixed" if bf16 else "fp32",
        "batch_size": config.batch_size,
        "max_length": config.max_length,
        "loss": f"LambdaLoss over [positive + {config.negatives_per_positive} hard negatives]",
        "negatives": "candidates serving would rank (see recsys.app.build)",
        "pairs": len(keep) * (1 + config.negatives_per_positive),
        "contexts": len(keep),
        "validation": {
            "before": before,
            "after": after,
            "examples": len(validation),
            "candidates": config.validation_candidates,
        },
        "train_seconds": round(time.perf_counter() - started, 1),
    }


def _train_dataset(
    examples: Sequence[Example], negs: Sequence[Sequence[str]], text: dict[str, str]
) -> Any:
    """A datasets.Dataset of (query, [positive, *negatives], [1, 0, ...]) lists for LambdaLoss."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "query": [e.context for e in examples],
            "docs": [
                [text[e.positive], *(text[i] for i in n)]
                for e, n in zip(examples, negs, strict=True)
            ],
            "labels": [[1] + [0] * len(n) for n in negs],
        }
    )


def _evaluator(
    validation: Sequence[Example],
    negs: Sequence[Sequence[str]],
    text: dict[str, str],
    device: str,
    bf16: bool,
) -> Any:
    """MRR@10 and NDCG@10 of each held-out positive among its retrieved hard negatives, scored
    in the precision fine-tuning trains in."""
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    class Reranking(CrossEncoderRerankingEvaluator):  # type: ignore[misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with autocast(device, bf16):
                return super().__call__(*args, **kwargs)

    samples: list[dict[str, str | list[str]]] = [
        {"query": e.context, "positive": [text[e.positive]], "negative": [text[i] for i in n]}
        for e, n in zip(validation, negs, strict=True)
    ]
    return Reranking(samples=samples, at_k=10, name="validation", batch_size=64, write_csv=False)


def _training_args(
    config: RankerTrainConfig, device: str, work: Path, evaluate: bool, bf16: bool
) -> Any:
    """Trainer arguments: seeded, no reporting, no dataloader workers, best checkpoint kept."""
    from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments

    # VALIDATIONS checkpoints to choose from; rounded up, because the trainer also validates at
    # the last step.
    every = max(-(-config.steps // VALIDATIONS), 1)
    return CrossEncoderTrainingArguments(
        output_dir=str(work),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=max(config.steps // 10, 1),
        eval_strategy="steps" if evaluate else "no",
        eval_steps=every,
        save_strategy="steps" if evaluate else "no",
        save_steps=every,
        save_total_limit=2,
        save_only_model=True,  # checkpoints only serve best-model selection: no optimizer state
        load_best_model_at_end=evaluate,
        metric_for_best_model="eval_validation_ndcg@10",
        greater_is_better=True,
        logging_steps=every,
        disable_tqdm=True,  # StepProgress is the one bar; the Trainer's also prints metric dicts
        report_to="none",
        dataloader_num_workers=0,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=device == "cpu",
        bf16=bf16,
    )


class StepProgress(TrainerCallback):
    """One bar over the optimizer steps, with the latest training loss and validation NDCG@10."""

    def __init__(self) -> None:
        self.bar: tqdm[Any] | None = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.bar = tqdm(total=state.max_steps, desc="fine-tuning", unit="step")

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            if control.should_evaluate:  # set by the Trainer's flow callback, which runs first
                self.bar.set_description("fine-tuning (validating)")

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.set_description("fine-tuning")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        shown = {"loss": "loss", "eval_validation_ndcg@10": "val ndcg@10"}
        self.postfix |= {label: f"{logs[k]:.4f}" for k, label in shown.items() if k in logs}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _validation_scores(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    return {
        "ndcg@10": round(float(metrics[f"{prefix}validation_ndcg@10"]), 4),
        "mrr@10": round(float(metrics[f"{prefix}validation_mrr@10"]), 4),
    }


def _best_validation(log_history: Sequence[dict[str, float]]) -> dict[str, float]:
    """The validation scores of the checkpoint the trainer kept (the best NDCG@10, earliest on
    ties, as the trainer picks it): read back from its log, not scored a second time."""
    evals = [e for e in log_history if "eval_validation_ndcg@10" in e]
    best = max(evals, key=lambda e: e["eval_validation_ndcg@10"])
    return _validation_scores(best, prefix="eval_")
