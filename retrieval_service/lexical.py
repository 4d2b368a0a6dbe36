"""The lexical index: BM25 over item text, beside the dense index, over the same rows.

An in-memory inverted index whose rows are the ItemStore's rows, so it changes exactly when the
catalog does: `FaissCatalog` adds a row's terms on upsert and removes them when the row becomes
a tombstone. It is therefore kept in step with online changes by the same journal / change log,
replay and hot swap as the vectors, with no durable state of its own; `recsys build` writes the
bundle's postings (`lexical.npz`) so loading does not re-tokenize the catalog.

Why not bm25s or tantivy: bm25s indexes are immutable (an upsert would rebuild the whole
index), and tantivy keeps its own segments on disk with their own commits, a second durable
state that would have to agree with the journal after kill -9 and across a swap.

Scoring is Lucene's BM25 (k1 1.2, b 0.75; idf ln(1 + (N - df + 0.5) / (df + 0.5))); text is
lower-cased, split into words (digits kept, so "item 123" is not "item 132"), English stop
words dropped, words Snowball-stemmed. N, df and the mean length count live rows only.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys.core.bundle import atomic_temp
from recsys.core.errors import DataLoss

# Recorded in the manifest: a bundle's postings are only valid with the tokenizer that made them.
TOKENIZER = "words-en-snowball-1"
K1 = 1.2
B = 0.75
_WORD = re.compile(r"\w+")
# Lucene's English stop words (EnglishAnalyzer's default set).
STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "if",
        "in",
        "into",
        "is",
        "it",
        "no",
        "not",
        "of",
        "on",
        "or",
        "such",
        "that",
        "the",
        "their",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "will",
        "with",
    ]
)


@functools.lru_cache(maxsize=1)
def _stemmer() -> Any:
    import Stemmer

    return Stemmer.Stemmer("english")


def tokenize(text: str) -> list[str]:
    """The terms of a text, in order (repeats kept)."""
    words = [w for w in _WORD.findall(text.lower().replace("_", " ")) if w not in STOP_WORDS]
    return list(_stemmer().stemWords(words)) if words else []


class _Postings:
    """One term's rows and term frequencies, appended in row order (amortised growth)."""

    __slots__ = ("rows", "size", "tfs")

    def __init__(self, rows: np.ndarray, tfs: np.ndarray) -> None:
        self.rows = rows
        self.tfs = tfs
        self.size = len(rows)

    def append(self, row: int, tf: int) -> None:
        if self.size == len(self.rows):
            capacity = max(4, 2 * self.size)
            self.rows = np.resize(self.rows[: self.size], capacity)
            self.tfs = np.resize(self.tfs[: self.size], capacity)
        self.rows[self.size] = row
        self.tfs[self.size] = tf
        self.size += 1


class LexicalIndex:
    """BM25 over rows 0..n-1; a removed row's postings stay but no longer count (N, df, lengths).

    Not thread-safe: its owner (the catalog) serialises changes and searches."""

    def __init__(self) -> None:
        self._term_ids: dict[str, int] = {}
        self._postings: list[_Postings] = []
        self._df = np.zeros(0, np.int64)  # live rows per term
        self._lengths = np.zeros(0, np.float32)  # terms per row (0 once removed)
        self._live = np.zeros(0, bool)
        self._rows = 0
        self._live_rows = 0
        self._total_length = 0.0

    @classmethod
    def build(cls, texts: Sequence[str]) -> LexicalIndex:
        index = cls()
        index.add(0, texts)
        return index

    def __len__(self) -> int:
        return self._live_rows

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def vocabulary(self) -> int:
        return len(self._term_ids)

    def add(self, first_row: int, texts: Sequence[str]) -> None:
        """Indexes texts at rows first_row, first_row + 1, ... (rows only ever grow)."""
        if first_row != self._rows:
            raise ValueError(
                f"lexical rows must grow in order: expected {self._rows}, got {first_row}"
            )
        self._grow(first_row + len(texts))
        for offset, text in enumerate(texts):
            row = first_row + offset
            counts = Counter(tokenize(text))
            for term, tf in counts.items():
                term_id = self._term_id(term)
                self._postings[term_id].append(row, tf)
                self._df[term_id] += 1
            length = sum(counts.values())
            self._lengths[row] = length
            self._live[row] = True
            self._total_length += length
            self._live_rows += 1
        self._rows = first_row + len(texts)

    def remove(self, row: int, text: str) -> None:
        """Stops counting a row (its item was replaced or deleted); `text` is what it indexed."""
        if not (0 <= row < self._rows) or not self._live[row]:
            return
        for term in set(tokenize(text)):
            term_id = self._term_ids.get(term)
            if term_id is not None:
                self._df[term_id] -= 1
        self._total_length -= float(self._lengths[row])
        self._lengths[row] = 0
        self._live[row] = False
        self._live_rows -= 1

    def scores(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows, BM25 scores) of the live rows sharing a term with the query, best first."""
        terms = Counter(t for t in tokenize(query) if t in self._term_ids)
        if not terms or not self._live_rows:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        total = np.zeros(self._rows, np.float32)
        mean_length = self._total_length / self._live_rows
        for term, repeats in terms.items():
            term_id = self._term_ids[term]
            df = float(self._df[term_id])
            if df <= 0:
                continue
            postings = self._postings[term_id]
            rows = postings.rows[: postings.size]
            tfs = postings.tfs[: postings.size]
            idf = np.log1p((self._live_rows - df + 0.5) / (df + 0.5))
            norm = K1 * (1.0 - B + B * self._lengths[rows] / mean_length)
            total[rows] += repeats * idf * tfs * (K1 + 1.0) / (tfs + norm)
        total[~self._live[: self._rows]] = 0.0
        rows = np.flatnonzero(total > 0)
        order = np.argsort(-total[rows], kind="stable")
        return rows[order], total[rows[order]]

    # -- the bundle's file ---------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Writes the postings (live rows only) atomically."""
        terms = list(self._term_ids)
        parts = [self._live_postings(self._postings[self._term_ids[t]]) for t in terms]
        rows = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        tfs = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
        offsets = np.cumsum([0] + [len(p[0]) for p in parts])
        fd, tmp = atomic_temp(path)
        with open(fd, "wb") as fh:
            np.savez(
                fh,
                tokenizer=np.array(TOKENIZER),
                # One UTF-8 blob: words never hold a newline, and no pickled objects.
                terms=np.frombuffer("\n".join(terms).encode(), np.uint8),
                offsets=offsets,
                rows=rows.astype(np.int64),
                tfs=tfs.astype(np.float32),
                lengths=self._lengths[: self._rows],
                live=self._live[: self._rows],
            )
        Path(tmp).replace(path)

    def _live_postings(self, postings: _Postings) -> tuple[np.ndarray, np.ndarray]:
        rows = postings.rows[: postings.size]
        keep = self._live[rows]
        return rows[keep], postings.tfs[: postings.size][keep]

    @classmethod
    def load(cls, path: Path) -> LexicalIndex:
        """Reads a file written by `save`; DataLoss (a bundle file: never the caller's fault)
        when it is unreadable or from another tokenizer."""
        try:
            with np.load(path, allow_pickle=False) as data:
                tokenizer = str(data["tokenizer"])
                if tokenizer != TOKENIZER:
                    raise DataLoss(
                        f"lexical index {path}: made by tokenizer {tokenizer}, this version "
                        f"reads {TOKENIZER}; rebuild the bundle"
                    )
                blob = data["terms"].tobytes().decode()
                terms = blob.split("\n") if blob else []
                offsets, rows, tfs = data["offsets"], data["rows"], data["tfs"]
                lengths, live = data["lengths"], data["live"]
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
            raise DataLoss(f"lexical index {path}: not readable ({exc})") from exc
        index = cls()
        index._grow(len(lengths))
        index._rows = len(lengths)
        index._lengths[: index._rows] = lengths
        index._live[: index._rows] = live
        index._live_rows = int(live.sum())
        index._total_length = float(lengths[live].sum())
        for term, start, end in zip(terms, offsets[:-1], offsets[1:], strict=True):
            term_id = index._term_id(term)
            index._postings[term_id] = _Postings(rows[start:end].copy(), tfs[start:end].copy())
            index._df[term_id] = end - start
        return index

    # -- growth --------------------------------------------------------------------------------

    def _term_id(self, term: str) -> int:
        term_id = self._term_ids.get(term)
        if term_id is None:
            term_id = self._term_ids[term] = len(self._postings)
            self._postings.append(_Postings(np.zeros(0, np.int64), np.zeros(0, np.float32)))
            if term_id >= len(self._df):
                self._df = np.resize(self._df, max(1024, 2 * len(self._df)))
                self._df[term_id:] = 0
        return term_id

    def _grow(self, rows: int) -> None:
        if rows <= len(self._lengths):
            return
        capacity = max(rows, 2 * len(self._lengths))
        lengths = np.zeros(capacity, np.float32)
        lengths[: self._rows] = self._lengths[: self._rows]
        live = np.zeros(capacity, bool)
        live[: self._rows] = self._live[: self._rows]
        self._lengths, self._live = lengths, live
