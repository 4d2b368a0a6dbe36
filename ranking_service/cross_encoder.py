"""Serving-side cross-encoder scoring with plain transformers, and the context text it reads."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from recsys.core.devices import resolve_device
from recsys.core.domain import RankContext
from recsys.core.errors import InvalidInput, first_line

log = logging.getLogger(__name__)

HISTORY_IN_CONTEXT = 5
# Tokens per (context, item) pair when a bundle or caller names none: training's default too.
DEFAULT_MAX_LENGTH = 128
# Padded tokens per forward pass (pairs × longest pair in the batch). On 2 idle CPU threads
# (benchmarks/reports/ce_backends.md, MovieLens pairs of 64-119 tokens), pairs/s at 1024 / 2048 /
# 4096 / 8192 / no budget: PyTorch fp32 90 / 90 / 88 / 77 / 71, the int8 model 464 / 479 / 463 /
# 421 / 394 (an earlier run on a busy machine had fp32 ~30% slower at 1024). 4096 is near the
# best of both; a longer max_length (256, 512) gets fewer pairs per pass: bounded attention
# memory and batch latency. GPUs want more (the gpu overlay sets 32768).
DEFAULT_MAX_BATCH_TOKENS = 4096
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def build_context(
    query: str, history_texts: Sequence[str], max_history: int = HISTORY_IN_CONTEXT
) -> str:
    """The cross-encoder's first segment, the same in training and serving.

    Query alone → the query; history alone → "Recently: t1; t2" (most recent first); both →
    "query. Recently: …". Empty when there is neither (the cross-encoder then cannot score).
    """
    query = query.strip()
    texts = [t.strip() for t in history_texts if t.strip()]
    recent = "; ".join(texts[:max_history])
    if query and recent:
        return f"{query}. Recently: {recent}"
    if recent:
        return f"Recently: {recent}"
    return query


def context_text(context: RankContext) -> str:
    """The cross-encoder's context for a request: its query and its history's texts (empty:
    nothing to read, so the cross-encoder cannot score)."""
    return build_context(context.query, [h.text for h in context.history])


def token_batches(lengths: Sequence[int], max_tokens: int, max_pairs: int) -> list[np.ndarray]:
    """Groups pair indices into batches of at most `max_pairs` and `max_tokens` padded tokens.

    Indices are sorted longest first (stable) and taken greedily, so a batch costs
    len(batch) × its first (longest) length ≤ max_tokens; a pair longer than `max_tokens` on its
    own goes alone. Every index appears exactly once.
    """
    if max_tokens < 1 or max_pairs < 1:
        raise ValueError(
            f"max_tokens and max_pairs must be positive, got {max_tokens}, {max_pairs}"
        )
    sizes = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(int(sizes[order[start]]), 1)
        size = max(1, min(max_pairs, max_tokens // longest))
        batches.append(order[start : start + size])
        start += size
    return batches


def encode_batches(
    tokenizer: Any,
    lock: threading.Lock,
    pairs: Sequence[tuple[str, str]],
    max_length: int,
    max_pairs: int,
    max_tokens: int,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(indices, padded int64 arrays) per token batch: one truncating tokenizer call for all pairs.

    Shared by every scorer backend, so they all see the same tokens and the same batches.
    """
    if not pairs:
        return
    with lock:
        encoded = tokenizer(
            [a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=max_length
        )
    keys = [k for k in _MODEL_INPUTS if k in encoded]
    lengths = [len(ids) for ids in encoded["input_ids"]]
    for idx in token_batches(lengths, max_tokens, max_pairs):
        features = [{k: encoded[k][i] for k in keys} for i in idx]
        with lock:
            padded = tokenizer.pad(features, padding=True, return_tensors="np")
        yield idx, {k: np.asarray(padded[k], dtype=np.int64) for k in keys}


def score_batches(
    tokenizer: Any,
    lock: threading.Lock,
    pairs: Sequence[tuple[str, str]],
    max_length: int,
    max_pairs: int,
    max_tokens: int,
    forward: Callable[[dict[str, np.ndarray]], np.ndarray],
) -> np.ndarray:
    """One float32 logit per pair, in input order: `forward` runs each of `encode_batches`."""
    out = np.empty(len(pairs), np.float32)
    for idx, arrays in encode_batches(tokenizer, lock, pairs, max_length, max_pairs, max_tokens):
        out[idx] = np.asarray(forward(arrays), np.float32).reshape(-1)
    return out


def _is_classifier(config: object) -> bool:
    architectures = getattr(config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


@dataclass
class CrossEncoderScorer:
    """A (context, item) → relevance logit model; fp16/bf16 on CUDA, fp32 on CPU."""

    name: str
    device: str
    max_length: int
    model: torch.nn.Module
    tokenizer: object

    def __post_init__(self) -> None:
        # Fast tokenizers are not safe to call from two threads at once.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(
        cls, model_dir: Path, device: str = "auto", max_length: int = DEFAULT_MAX_LENGTH
    ) -> CrossEncoderScorer:
        """Loads a sequence-classification model (or a bare backbone with a fresh 1-logit head)."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise InvalidInput(f"{model_dir}: not a Hugging Face model directory (no config.json)")
        resolved = resolve_device(device)
        try:
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
            # A backbone that was never a classifier gets one logit, as sentence-transformers does.
            if not _is_classifier(config):
                config.num_labels = 1
            # Seeded without touching the caller's RNG, so a fresh head scores the same every load.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                # fp32 whatever the checkpoint's dtype; CUDA halves it below.
                model = AutoModelForSequenceClassification.from_pretrained(
                    model_dir, config=config, local_files_only=True, dtype=torch.float32
                )
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            first = first_line(exc)
            raise InvalidInput(f"{model_dir}: cannot load a cross-encoder ({first})") from None
        if model.config.num_labels != 1:
            raise InvalidInput(
                f"{model_dir}: expected a 1-logit relevance model, found {model.config.num_labels} labels"
            )
        if resolved == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            model = model.to(device="cuda", dtype=dtype)
        model.eval()
        return cls(model_dir.name, resolved, max_length, model, tokenizer)

    def score(
        self,
        pairs: Sequence[tuple[str, str]],
        batch_size: int = 64,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ) -> np.ndarray:
        """Raw logits for each pair, in input order.

        Batches hold at most `batch_size` pairs and `max_batch_tokens` padded tokens, grouped by
        token length so short pairs do not pay for a long one's padding.
        """

        def forward(arrays: dict[str, np.ndarray]) -> np.ndarray:
            batch = {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}
            return self.model(**batch).logits.squeeze(-1).float().cpu().numpy()

        with torch.inference_mode():
            return score_batches(
                self.tokenizer,
                self._tokenizer_lock,
                pairs,
                self.max_length,
                batch_size,
                max_batch_tokens,
                forward,
            )
