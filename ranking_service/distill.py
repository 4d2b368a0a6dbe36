"""Distils the fine-tuned cross-encoder into a student with fewer transformer layers.

The student is the backbone (`base_dir`) cut to `layers` of its encoder layers, embeddings kept,
with a fresh 1-logit head, trained to reproduce the teacher's logits on serving-like
(context, item) pairs. It saves as a plain sequence-classification directory that
`CrossEncoderScorer.load` reads unchanged.

The loss is MSE on the teacher's *raw* logits plus a listwise term: batches hold groups of
candidates of one context, and the KL between the teacher's and the student's softmax over each
group weighs the order within a context. Raw-logit MSE stays because fusion weighs the
cross-encoder's logit as a feature (see `fusion_fit`): the student must keep the teacher's scale
and offset, not only its order. Per-context standardised targets ranked about as well within a
context but lost the scale (pooled Spearman 0.65, MSE 1.2), so they were dropped.

Defaults, measured on the MovieLens teacher (6 layers): 60 history contexts of 5 titles with
20-50 candidates (2112 pairs), agreement on 20 other contexts (685 pairs), 150 steps, 2 threads:

    layers  loss              Spearman  per-context  MSE    pairs/s (teacher 66)
    2       MSE               0.85      0.79         0.064  195
    2       MSE + 5 listwise  0.88      0.85         0.046  195
    2       MSE + 10 listwise 0.88      0.86         0.045  195
    3       MSE               0.86      0.82         0.050  129
    3       MSE + 2 listwise  0.87      0.87         0.052  129
    3       MSE + 5 listwise  0.91      0.89         0.035  129
    3       MSE + 10 listwise 0.90      0.89         0.037  129

Three layers (first, third, fifth) halve the teacher's cost and keep its order best; 300 steps
were no better (per-context 0.90, MSE 0.038: it starts to fit the 1.9k training pairs). With 2
layers and MSE alone, keeping the first two layers instead of spreading them, or cutting down the
teacher itself instead of the backbone (pass it as `base_dir`), moved per-context Spearman by at
most 0.02, within the noise of 20 contexts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ranking_service.cross_encoder import DEFAULT_MAX_LENGTH, CrossEncoderScorer
from recsys.core.devices import resolve_device
from recsys.core.errors import InvalidInput, first_line

log = logging.getLogger(__name__)

Pair = tuple[str, str]

HELD_OUT = 0.1  # share of the contexts (or, with fewer than MIN_CONTEXTS, of the pairs)
MIN_CONTEXTS = 10  # distinct contexts needed to hold out whole contexts
MIN_PAIRS = 20
_TEACHER_CHUNK = 512  # pairs per teacher-scoring call: one progress-bar tick
_SCORE_BATCH = 64


@dataclass(frozen=True)
class DistillConfig:
    """Student size and training knobs; `steps` counts optimizer steps of `batch_size` pairs."""

    layers: int = 3
    steps: int = 150
    batch_size: int = 32
    # Candidates of one context per batch group: the lists the listwise term compares.
    group_size: int = 8
    learning_rate: float = 2e-4
    # Weight of the listwise KL term next to the MSE; 0 = MSE alone.
    listwise_weight: float = 5.0
    max_length: int = DEFAULT_MAX_LENGTH
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        minimums = {"layers": 1, "steps": 1, "batch_size": 1, "group_size": 1, "max_length": 8}
        for name, least in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InvalidInput(f"distill {name}={value!r}: must be an integer >= {least}")
        if not (math.isfinite(self.learning_rate) and 0.0 < self.learning_rate < 1.0):
            raise InvalidInput(
                f"distill learning_rate={self.learning_rate!r}: must be within (0, 1)"
            )
        if not (math.isfinite(self.listwise_weight) and self.listwise_weight >= 0.0):
            raise InvalidInput(
                f"distill listwise_weight={self.listwise_weight!r}: must be finite and >= 0"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidInput(f"distill device={self.device!r}: expected auto, cpu or cuda")


def distill(
    teacher_dir: Path,
    base_dir: Path,
    pairs: Sequence[Pair],
    out_dir: Path,
    config: DistillConfig,
) -> dict[str, Any]:
    """Trains a `config.layers`-layer student on the teacher's logits for `pairs`, saves it to
    out_dir and returns the manifest section: what was trained and how closely the student
    follows the teacher on held-out contexts (never trained on)."""
    started = time.perf_counter()
    pairs = [(str(a), str(b)) for a, b in pairs]
    if len(pairs) < MIN_PAIRS:
        raise InvalidInput(f"distill pairs: need at least {MIN_PAIRS}, got {len(pairs)}")
    device = resolve_device(config.device)
    teacher_dir, base_dir, out_dir = Path(teacher_dir), Path(base_dir), Path(out_dir)

    # The student first: a bad base or layer count fails before the teacher's long scoring.
    model, tokenizer, kept = build_student(base_dir, config.layers, config.seed)
    targets = teacher_scores(teacher_dir, pairs, device, config.max_length)
    rng = random.Random(config.seed)
    train_idx, held_idx = held_out_split(pairs, rng)
    model.to(device)
    final_loss = _train(
        model,
        tokenizer,
        [pairs[i] for i in train_idx],
        targets[train_idx],
        config,
        device,
        rng,
    )
    model.eval()
    student = CrossEncoderScorer(out_dir.name, device, config.max_length, model, tokenizer)
    train_scores = student.score([pairs[i] for i in train_idx], batch_size=_SCORE_BATCH)
    held_pairs = [pairs[i] for i in held_idx]
    held = agreement(held_pairs, targets[held_idx], student.score(held_pairs, _SCORE_BATCH))

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    seconds = round(time.perf_counter() - started, 1)
    log.info("distilled %d-layer student in %.1fs: held-out %s", config.layers, seconds, held)
    return {
        "teacher": str(teacher_dir),
        "base": str(base_dir),
        "layers": config.layers,
        "layer_indices": kept,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "listwise_weight": config.listwise_weight,
        "max_length": config.max_length,
        "loss": "MSE on teacher logits"
        + (f" + {config.listwise_weight} × listwise KL" if config.listwise_weight else ""),
        "pairs": len(pairs),
        "train_pairs": len(train_idx),
        "seconds": seconds,
        "train_mse": round(float(np.mean((train_scores - targets[train_idx]) ** 2)), 5),
        "final_batch_loss": round(final_loss, 5),
        "held_out": held,
    }


def teacher_scores(
    teacher_dir: Path, pairs: Sequence[Pair], device: str, max_length: int
) -> np.ndarray:
    """The teacher's fp32 logits for `pairs`, in order (loaded on the CPU first: the scorer
    halves a CUDA model, and the targets should not carry that rounding)."""
    cpu = CrossEncoderScorer.load(teacher_dir, device="cpu", max_length=max_length)
    teacher = dataclasses.replace(cpu, device=device, model=cpu.model.to(device))
    out = np.empty(len(pairs), np.float32)
    for start in tqdm(
        range(0, len(pairs), _TEACHER_CHUNK), desc="teacher scoring", unit="chunk", leave=False
    ):
        chunk = pairs[start : start + _TEACHER_CHUNK]
        out[start : start + len(chunk)] = teacher.score(chunk, batch_size=_SCORE_BATCH)
    return out


def held_out_split(pairs: Sequence[Pair], rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) pair indices: HELD_OUT of the distinct contexts, all their candidates,
    so agreement is measured on contexts the student never saw; with fewer than MIN_CONTEXTS
    contexts, HELD_OUT of the pairs. Both sides are non-empty (at least two held-out pairs)."""
    contexts = sorted({a for a, _ in pairs})
    if len(contexts) >= MIN_CONTEXTS:
        chosen = set(rng.sample(contexts, max(1, round(HELD_OUT * len(contexts)))))
        held = np.array([i for i, (a, _) in enumerate(pairs) if a in chosen], dtype=np.int64)
    else:
        count = max(2, round(HELD_OUT * len(pairs)))
        held = np.array(sorted(rng.sample(range(len(pairs)), count)), dtype=np.int64)
    train = np.setdiff1d(np.arange(len(pairs)), held)
    return train, held


def build_student(base_dir: Path, layers: int, seed: int) -> tuple[Any, Any, list[int]]:
    """(model, tokenizer, kept layer indices): `base_dir` as a 1-logit classifier (head seeded)
    keeping `layers` of its encoder layers, evenly spaced from the first (see `spread_layers`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (base_dir / "config.json").is_file():
        raise InvalidInput(f"{base_dir}: not a Hugging Face model directory (no config.json)")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                base_dir, num_labels=1, local_files_only=True, dtype=torch.float32
            )
        tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise InvalidInput(f"{base_dir}: cannot load a student backbone ({first})") from None
    encoder: Any = getattr(model.base_model, "encoder", None)
    stack = getattr(encoder, "layer", None)
    if not isinstance(stack, torch.nn.ModuleList):
        raise InvalidInput(f"{base_dir}: no encoder layer stack to cut down")
    if layers > len(stack):
        raise InvalidInput(f"distill layers={layers}: the backbone has only {len(stack)}")
    kept = spread_layers(len(stack), layers)
    encoder.layer = torch.nn.ModuleList(stack[i] for i in kept)
    model.config.num_hidden_layers = layers
    return model, tokenizer, kept


def spread_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices of `total`: evenly spaced from the first, so 6 → 3 is [0, 2, 4]."""
    return [i * total // keep for i in range(keep)]


def agreement(pairs: Sequence[Pair], teacher: np.ndarray, student: np.ndarray) -> dict[str, Any]:
    """How closely student logits follow the teacher's: pooled Spearman, MSE, and the mean
    Spearman within each context with 3+ candidates (the order the ranker actually uses)."""
    from scipy.stats import spearmanr

    def rho(a: np.ndarray, b: np.ndarray) -> float:
        value = float(spearmanr(a, b).statistic)
        return value if math.isfinite(value) else 0.0

    groups: dict[str, list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        groups.setdefault(context, []).append(i)
    within = [rho(teacher[g], student[g]) for g in groups.values() if len(g) >= 3]
    return {
        "pairs": len(pairs),
        "contexts": len(groups),
        "spearman": round(rho(teacher, student), 4),
        "spearman_per_context": round(float(np.mean(within)), 4) if within else None,
        "mse": round(float(np.mean((teacher - student) ** 2)), 5),
    }


def _train(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Pair],
    targets: np.ndarray,
    config: DistillConfig,
    device: str,
    rng: random.Random,
) -> float:
    """AdamW with linear warmup (10%) and decay over `config.steps` batches; returns the last
    batch's loss. Seeded without touching the caller's torch RNG."""
    from transformers import get_linear_schedule_with_warmup

    encoded = tokenizer(
        [a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=config.max_length
    )
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    features = [{k: encoded[k][i] for k in keys} for i in range(len(pairs))]
    target = torch.as_tensor(targets, dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, config.steps // 10), config.steps)
    batches = _batches([a for a, _ in pairs], config.batch_size, config.group_size, rng)
    loss_value = float("nan")
    model.train()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(config.seed)  # dropout
        bar = tqdm(range(config.steps), desc="distilling", unit="step")
        for step in bar:
            groups = next(batches)
            idx = [i for g in groups for i in g]
            padded = tokenizer.pad([features[i] for i in idx], padding=True, return_tensors="pt")
            logits = model(**{k: padded[k].to(device) for k in keys}).logits.squeeze(-1)
            wanted = target[idx]
            loss = torch.nn.functional.mse_loss(logits, wanted)
            if config.listwise_weight > 0:
                loss = loss + config.listwise_weight * _listwise(logits, wanted, groups)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            if step % 10 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{loss_value:.4f}")
        bar.close()
    return loss_value


def _batches(
    contexts: Sequence[str], batch_size: int, group_size: int, rng: random.Random
) -> Iterator[list[list[int]]]:
    """Endless batches of groups of indices: each group ≤ `group_size` candidates of one context,
    each batch ≤ `batch_size` pairs. Every pair comes once per epoch, in a fresh order."""
    group_size = min(group_size, batch_size)
    by_context: dict[str, list[int]] = {}
    for i, context in enumerate(contexts):
        by_context.setdefault(context, []).append(i)
    lists = list(by_context.values())
    while True:
        groups: list[list[int]] = []
        for members in lists:
            shuffled = rng.sample(members, len(members))
            groups += [shuffled[s : s + group_size] for s in range(0, len(shuffled), group_size)]
        rng.shuffle(groups)
        batch: list[list[int]] = []
        size = 0
        for group in groups:
            if size + len(group) > batch_size:
                yield batch
                batch, size = [], 0
            batch.append(group)
            size += len(group)
        if batch:
            yield batch


def _listwise(logits: torch.Tensor, targets: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Mean KL(teacher ‖ student) of the softmax over each group of 2+ candidates of a context."""
    terms = []
    start = 0
    for group in groups:
        end = start + len(group)
        if len(group) >= 2:
            want = torch.log_softmax(targets[start:end], dim=0)
            got = torch.log_softmax(logits[start:end], dim=0)
            terms.append(torch.sum(want.exp() * (want - got)))
        start = end
    if not terms:
        return logits.sum() * 0.0
    return torch.stack(terms).mean()
