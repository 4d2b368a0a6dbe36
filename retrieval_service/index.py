"""FAISS ANN index over L2-normalised vectors (inner product = cosine); row id = insertion position."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsys.core.bundle import atomic_temp
from recsys.core.devices import resolve_device
from recsys.core.errors import InvalidInput

log = logging.getLogger(__name__)

# HNSW search breadth: 64 keeps recall@10 near 1 on catalogs of this size at a small cost.
HNSW_EF_SEARCH = 64
# k-means points per centroid below which FAISS warns that clusters are poorly trained.
CLUSTER_POINTS = 39
# FAISS GPU indexes answer at most this many neighbours per query.
GPU_MAX_K = 2048


class VectorIndex:
    """A FAISS index built from a factory string; searches by inner product, on GPU when possible."""

    def __init__(self, index: Any, factory: str, device: str, nprobe: int) -> None:
        self._index = index
        self.factory = factory
        self.dimension = int(index.d)
        self.device = device  # "cpu" or "cuda:0"
        self.nprobe = nprobe
        # Seconds spent training and adding in `build` (empty for a loaded index), for reports.
        self.build_timings: dict[str, float] = {}

    @classmethod
    def build(
        cls, vectors: np.ndarray, factory: str = "Flat", device: str = "auto", nprobe: int = 16
    ) -> VectorIndex:
        """Creates, trains (when the type needs it) and fills an index with `vectors` (rows 0..n-1)."""
        vectors = _as_matrix(vectors, None, "vectors")
        index = _create(factory, vectors.shape[1])
        started = time.perf_counter()
        if not index.is_trained:
            _check_training_size(index, factory, len(vectors))
            _skip_polysemous_training(index)
            try:
                index.train(vectors)
            except RuntimeError as exc:
                raise InvalidInput(
                    f"--index-factory {factory!r}: FAISS could not train on {len(vectors)} "
                    f"vectors ({_faiss_message(exc)})"
                ) from exc
        trained = time.perf_counter()
        _set_search_parameters(index, nprobe)
        built = cls._placed(index, factory, device, nprobe)
        placed = time.perf_counter()
        built.add(vectors)
        built.build_timings = {
            "train_seconds": trained - started,
            "to_device_seconds": placed - trained,
            "add_seconds": time.perf_counter() - placed,
        }
        return built

    @classmethod
    def load(cls, path: Path, factory: str, device: str = "auto", nprobe: int = 16) -> VectorIndex:
        """Reads an index written by `save` and places it on the requested device."""
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"index file {path}: does not exist")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise InvalidInput(
                f"index file {path}: not a readable FAISS index ({_faiss_message(exc)})"
            ) from exc
        _set_search_parameters(index, nprobe)
        return cls._placed(index, factory, device, nprobe)

    @classmethod
    def _placed(cls, index: Any, factory: str, device: str, nprobe: int) -> VectorIndex:
        """Moves a CPU index to the GPU when asked (or auto) and possible; CPU otherwise."""
        if resolve_device(device) != "cuda":
            return cls(index, factory, "cpu", nprobe)
        if faiss.get_num_gpus() == 0 or not hasattr(faiss, "StandardGpuResources"):
            log.warning(
                "FAISS has no GPU support in this install (faiss-cpu); index %r stays on CPU",
                factory,
            )
            return cls(index, factory, "cpu", nprobe)
        try:
            gpu_index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
        except RuntimeError as exc:
            log.warning(
                "index %r cannot run on the GPU (%s); it stays on CPU",
                factory,
                _faiss_message(exc),
            )
            return cls(index, factory, "cpu", nprobe)
        _set_search_parameters(gpu_index, nprobe, gpu=True)
        return cls(gpu_index, factory, "cuda:0", nprobe)

    @property
    def ntotal(self) -> int:
        """Rows stored, including rows the catalog has tombstoned."""
        return int(self._index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        """Appends rows; their ids continue from the current ntotal."""
        vectors = _as_matrix(vectors, self.dimension, "vectors")
        if len(vectors):
            self._index.add(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32, row ids int64) per query; missing neighbours are -1 / -inf."""
        queries = _as_matrix(queries, self.dimension, "queries")
        if k < 1:
            raise InvalidInput(f"k {k}: must be at least 1")
        if self.ntotal == 0 or len(queries) == 0:
            return _empty_result(len(queries), k)
        searched_k = min(k, self.ntotal)
        if self.device != "cpu" and searched_k > GPU_MAX_K:
            log.warning("k=%d exceeds the FAISS GPU limit; returning the top %d", k, GPU_MAX_K)
            searched_k = GPU_MAX_K
        scores, rows = self._index.search(queries, searched_k)
        # FAISS marks missing neighbours with -1 and a huge negative score; make it -inf.
        scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
        if searched_k == k:
            return scores, rows.astype(np.int64)
        all_scores, all_rows = _empty_result(len(queries), k)
        all_scores[:, :searched_k] = scores
        all_rows[:, :searched_k] = rows
        return all_scores, all_rows

    def save(self, path: Path) -> None:
        """Writes a CPU copy of the index atomically (a reader never sees a partial file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cpu_index = self._index if self.device == "cpu" else faiss.index_gpu_to_cpu(self._index)
        fd, tmp = atomic_temp(path)
        os.close(fd)
        try:
            faiss.write_index(cpu_index, tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this index."""
        return {
            "factory": self.factory,
            "size": self.ntotal,
            "nprobe": self.nprobe,
            "device_built": self.device,
        }


def check_factory(factory: str, dimension: int, count: int) -> None:
    """Fails fast (InvalidInput) when `factory` is invalid or cannot be trained on `count` vectors."""
    index = _create(factory, dimension)
    if not index.is_trained:
        _check_training_size(index, factory, count)


def _create(factory: str, dimension: int) -> Any:
    if not factory or not factory.strip():
        raise InvalidInput("--index-factory '': empty FAISS factory string (try 'Flat')")
    try:
        return faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InvalidInput(
            f"--index-factory {factory!r}: invalid FAISS factory string ({_faiss_message(exc)})"
        ) from exc


def _check_training_size(index: Any, factory: str, count: int) -> None:
    """FAISS needs >= nlist points for IVF and >= 2**nbits for PQ codebooks; say so in one line."""
    # (hard minimum, what it trains, FAISS's clustering object whose warning we replace)
    needs: list[tuple[int, str, Any]] = []
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        needs.append((int(ivf.nlist), f"{ivf.nlist} IVF lists", ivf.cp))
    pq = _product_quantizer(index)
    if pq is not None:
        needs.append((int(pq.ksub), f"{pq.ksub} PQ centroids ({pq.nbits}-bit codes)", pq.cp))
    for minimum, what, _ in needs:
        if count < minimum:
            raise InvalidInput(
                f"--index-factory {factory!r}: needs at least {minimum} vectors to train "
                f"{what}, got {count} (about {CLUSTER_POINTS * minimum} for good clusters); "
                "use a smaller factory such as 'Flat' or 'HNSW32'"
            )
    thin = [what for minimum, what, _ in needs if count < CLUSTER_POINTS * minimum]
    if thin:
        log.warning(
            "index %r: %d training vectors is thin for %s (FAISS recommends %d points per centroid)",
            factory,
            count,
            " and ".join(thin),
            CLUSTER_POINTS,
        )
    # FAISS would print the same advice to stderr once per k-means run (16 times for PQ16);
    # the threshold only gates that message, so lower it after logging ours once.
    for _, _, clustering in needs:
        clustering.min_points_per_centroid = 1


def _skip_polysemous_training(index: Any) -> None:
    """The factory's "PQn" also trains a polysemous code ordering (30x the training time); it only
    pays off with Hamming pre-filtering (polysemous_ht), which search never enables, and it
    merely permutes centroids, so skipping it leaves results unchanged."""
    base = _coarse_base(index)
    if getattr(base, "do_polysemous_training", False):
        base.do_polysemous_training = False


def _product_quantizer(index: Any) -> Any | None:
    """The PQ codebook of an IndexPQ / IndexIVFPQ (behind any pre-transform), if there is one."""
    return getattr(_coarse_base(index), "pq", None)


def _coarse_base(index: Any) -> Any:
    """The concrete index under any pre-transform: the IndexIVF* subclass for IVF types."""
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexPreTransform):
        base = faiss.downcast_index(base.index)
    ivf = faiss.try_extract_index_ivf(base)
    return faiss.downcast_index(ivf) if ivf is not None else base


def _set_search_parameters(index: Any, nprobe: int, gpu: bool = False) -> None:
    """nprobe for IVF (capped at nlist) and efSearch for HNSW; other types have nothing to set."""
    kind = _index_kind(index)
    if gpu:
        # Cloning copies nprobe already; setting it again only makes the intent explicit.
        if "IVF" in kind:
            try:
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
            except RuntimeError as exc:
                log.debug("nprobe not set on GPU index %s: %s", kind, _faiss_message(exc))
        return
    space = faiss.ParameterSpace()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        space.set_index_parameter(index, "nprobe", max(1, min(nprobe, int(ivf.nlist))))
    if "HNSW" in kind:
        space.set_index_parameter(index, "efSearch", HNSW_EF_SEARCH)


def _index_kind(index: Any) -> str:
    """The concrete FAISS class name, looking through pre-transforms."""
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexPreTransform):
        base = faiss.downcast_index(base.index)
    return type(base).__name__


@functools.cache
def _gpu_resources() -> Any:
    """One StandardGpuResources per process: each one reserves scratch memory on the device."""
    return faiss.StandardGpuResources()


def _as_matrix(vectors: np.ndarray, dimension: int | None, what: str) -> np.ndarray:
    """A C-contiguous float32 (n, d) view, checked against the index dimension."""
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise InvalidInput(f"{what}: expected a 2-D array (n, dim), got shape {array.shape}")
    if dimension is not None and array.shape[1] != dimension:
        raise InvalidInput(f"{what}: expected dimension {dimension}, got {array.shape[1]}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _empty_result(queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.full((queries, k), -np.inf, dtype=np.float32),
        np.full((queries, k), -1, dtype=np.int64),
    )


def _faiss_message(exc: BaseException) -> str:
    """The useful part of a FAISS C++ exception, without its function signature, file and line."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    text = re.sub(r"^Error: '.*?' failed: ", "", text)
    return text or type(exc).__name__
