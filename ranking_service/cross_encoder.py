"""Serving-side cross-encoder scoring with plain transformers, and the context text it reads."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from recsys.core.devices import resolve_device
from recsys.core.errors import InvalidInput

log = logging.getLogger(__name__)

HISTORY_IN_CONTEXT = 5
# Tokens per (context, item) pair when a bundle or caller names none: training's default too.
DEFAULT_MAX_LENGTH = 128


def build_context(
    query: str, history_texts: Sequence[str], max_history: int = HISTORY_IN_CONTEXT
) -> str:
    """The cross-encoder's first segment, the same in training and serving.

    Query alone → the query; history alone → "Recently: t1; t2" (most recent first); both →
    "query. Recently: …". Empty when there is neither (the cross-encoder then cannot score).
    """
    query = query.strip()
    recent = "; ".join(t.strip() for t in list(history_texts)[:max_history] if t.strip())
    if query and recent:
        return f"{query}. Recently: {recent}"
    if recent:
        return f"Recently: {recent}"
    return query


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
            kwargs = {} if _is_classifier(config) else {"num_labels": 1}
            # Seeded without touching the caller's RNG, so a fresh head scores the same every load.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                # fp32 whatever the checkpoint's dtype; CUDA halves it below.
                model = AutoModelForSequenceClassification.from_pretrained(
                    model_dir, local_files_only=True, dtype=torch.float32, **kwargs
                )
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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

    def score(self, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> np.ndarray:
        """Raw logits for each pair, in input order; batches are length-sorted to cut padding."""
        if not pairs:
            return np.zeros(0, np.float32)
        order = np.argsort([-(len(a) + len(b)) for a, b in pairs], kind="stable")
        out = np.empty(len(pairs), np.float32)
        with torch.inference_mode():
            for start in range(0, len(pairs), batch_size):
                idx = order[start : start + batch_size]
                with self._tokenizer_lock:
                    batch = self.tokenizer(  # type: ignore[operator]
                        [pairs[i][0] for i in idx],
                        [pairs[i][1] for i in idx],
                        padding=True,
                        truncation=True,
                        max_length=self.max_length,
                        return_tensors="pt",
                    )
                batch = {k: v.to(self.device) for k, v in batch.items()}
                logits = self.model(**batch).logits.squeeze(-1)
                out[idx] = logits.float().cpu().numpy()
        return out
