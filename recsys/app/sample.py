"""The embedded default dataset: a small synthetic shop catalog and interaction log, made here.

The generator is deterministic (fixed seed, stdlib only) and the output is committed under
recsys/app/sample_data/, so `recsys demo` and the tests need no download. The shop's product
table, which it draws from, is a data file there too (products.toml). It has structure for the
models to learn: users prefer 1-3 categories and a brand in each, popularity is Zipf-skewed,
sessions move from a searched product to its alternatives and then to an accessory, and about a
third of the rows carry the search query that led to the item.

Regenerate with `python -m recsys.app.sample`.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import random
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from itertools import accumulate
from pathlib import Path
from typing import Any, TypeVar

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
CATALOG_FILE = "catalog.csv"
INTERACTIONS_FILE = "interactions.csv"
QUERIES_FILE = "queries.jsonl"
PRODUCTS_FILE = "products.toml"

T = TypeVar("T")

# Event weights: what a view, an add-to-cart and a purchase count for as implicit feedback.
VIEW, CART, PURCHASE = 1, 3, 5
USERS = 200
START_EPOCH = 1_709_251_200  # 2024-03-01T00:00:00Z
WINDOW_SECONDS = 90 * 24 * 3600


@dataclass(frozen=True)
class ProductType:
    """A kind of product: its variants, the searches that find it, and what people buy with it."""

    name: str
    variants: tuple[str, ...]
    queries: tuple[str, ...]
    price: tuple[int, int]
    features: tuple[str, ...]
    accessories: tuple[str, ...] = ()


@dataclass(frozen=True)
class Category:
    name: str
    brands: tuple[str, ...]
    use: str
    types: tuple[ProductType, ...]
    popularity: float = 1.0


@cache
def categories() -> tuple[Category, ...]:
    """The product table (sample_data/products.toml) in file order, which the draws follow."""
    with (SAMPLE_DIR / PRODUCTS_FILE).open("rb") as handle:
        table = tomllib.load(handle)
    return tuple(
        Category(
            c["name"],
            tuple(c["brands"]),
            c["use"],
            tuple(_product_type(t) for t in c["types"]),
            c.get("popularity", 1.0),
        )
        for c in table["categories"]
    )


def _product_type(t: dict[str, Any]) -> ProductType:
    low, high = t["price"]
    return ProductType(
        t["name"],
        tuple(t["variants"]),
        tuple(t["queries"]),
        (low, high),
        tuple(t["features"]),
        tuple(t.get("accessories", ())),
    )


# -- deterministic randomness ---------------------------------------------------------------------


class Rng:
    """Every draw goes through random.random(), whose output Python guarantees across versions
    for a given seed, so the committed files regenerate byte for byte anywhere."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def uniform(self) -> float:
        return self._random.random()

    def chance(self, p: float) -> bool:
        return self._random.random() < p

    def integer(self, low: int, high: int) -> int:
        """Uniform in [low, high]."""
        return low + min(int(self._random.random() * (high - low + 1)), high - low)

    def choice(self, items: Sequence[T], weights: Sequence[float] | None = None) -> T:
        if weights is None:
            return items[self.integer(0, len(items) - 1)]
        cumulative = list(accumulate(weights))
        point = self._random.random() * cumulative[-1]
        return items[min(bisect.bisect_right(cumulative, point), len(items) - 1)]

    def sample(self, items: Sequence[T], k: int) -> list[T]:
        pool = list(items)
        return [pool.pop(self.integer(0, len(pool) - 1)) for _ in range(min(k, len(pool)))]


# -- catalog --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    item_id: str
    title: str
    description: str
    category: str
    brand: str
    variant: str
    price: str
    kind: ProductType
    popularity: float


def make_catalog(rng: Rng) -> list[Product]:
    """Every (type, variant) from two or three brands of its category, with Zipf popularity."""
    drafts: list[tuple[str, str, str, str, str, str, ProductType]] = []
    for category in categories():
        for kind in category.types:
            for variant in kind.variants:
                brands = rng.sample(category.brands, 3 if rng.chance(0.25) else 2)
                for brand in brands:
                    title = f"{brand} {variant} {kind.name}"
                    features = rng.sample(kind.features, 2)
                    description = (
                        f"{_lead(variant, kind.name)} from {brand} "
                        f"with {features[0]} and {features[1]}. {category.use}"
                    )
                    low, high = kind.price
                    price = f"{rng.integer(low, high)}.99"
                    drafts.append((title, description, category.name, brand, variant, price, kind))
    # Zipf popularity over a shuffled order, so the head is spread over categories.
    ranks = rng.sample(range(len(drafts)), len(drafts))
    return [
        Product(f"P{n + 1:04d}", *draft, popularity=1.0 / (rank + 1) ** 0.7)
        for n, (draft, rank) in enumerate(zip(drafts, ranks, strict=True))
    ]


def _lead(variant: str, kind: str) -> str:
    """ "A Compact Pump Espresso Machine", or for plurals "True Wireless Earbuds"."""
    phrase = f"{variant} {kind}"
    if kind.endswith("s") and not kind.endswith("ss"):
        return phrase
    article = "An" if variant[0].lower() in "aeiou8" else "A"
    return f"{article} {phrase}"


# -- interactions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: int
    weight: int
    query: str


@dataclass(frozen=True)
class User:
    user_id: str
    categories: tuple[str, ...]
    brands: dict[str, str]  # category → favourite brand
    sessions: int


def make_users(rng: Rng) -> list[User]:
    """Users with 1-3 preferred categories, a favourite brand in each, and skewed activity."""
    table = categories()
    names = [c.name for c in table]
    weights = [c.popularity for c in table]
    brands = {c.name: c.brands for c in table}
    users = []
    for n in range(USERS):
        count = rng.choice([1, 2, 3], [0.35, 0.45, 0.2])
        preferred: list[str] = []
        while len(preferred) < count:
            name = rng.choice(names, weights)
            if name not in preferred:
                preferred.append(name)
        favourite = {name: rng.choice(brands[name]) for name in preferred}
        # A long tail of light users and a few heavy ones.
        sessions = 1 + int(20 * rng.uniform() ** 2)
        users.append(User(f"U{n + 1:04d}", tuple(preferred), favourite, sessions))
    return users


class Shop:
    """Lookups the session simulator needs: products by category and by type."""

    def __init__(self, products: list[Product]) -> None:
        self.by_category: dict[str, list[Product]] = {}
        self.by_type: dict[str, list[Product]] = {}
        for p in products:
            self.by_category.setdefault(p.category, []).append(p)
            self.by_type.setdefault(p.kind.name, []).append(p)
        accessory_names = {a for p in products for a in p.kind.accessories}
        self.accessory_names = accessory_names

    def pick(
        self, rng: Rng, pool: Sequence[Product], brand: str | None, avoid: set[str]
    ) -> Product:
        options = [p for p in pool if p.item_id not in avoid] or list(pool)
        # Brand affinity: the favourite brand is several times likelier than its popularity alone.
        weights = [p.popularity * (4.0 if p.brand == brand else 1.0) for p in options]
        return rng.choice(options, weights)


def _query_for(rng: Rng, product: Product) -> str:
    """What a user plausibly typed to find this product."""
    base = rng.choice(product.kind.queries)
    roll = rng.uniform()
    if roll < 0.2:
        return f"{product.brand.lower()} {base}"
    if roll < 0.45:
        return f"{product.variant} {product.kind.name}".lower()
    return base


def simulate_session(rng: Rng, shop: Shop, user: User, start: int, exploring: bool) -> list[Event]:
    """Search or browse a category, view alternatives of one type, maybe buy, maybe add an accessory."""
    category = rng.choice(list(shop.by_category)) if exploring else rng.choice(user.categories)
    brand = user.brands.get(category)
    mains = [p for p in shop.by_category[category] if p.kind.name not in shop.accessory_names]
    first = shop.pick(rng, mains or shop.by_category[category], brand, set())
    searched = rng.chance(0.45)
    query = _query_for(rng, first) if searched else ""

    events: list[Event] = []
    clock = start

    def emit(product: Product, weight: int, text: str = "") -> None:
        nonlocal clock
        clock += rng.integer(20, 400)
        events.append(Event(user.user_id, product.item_id, clock, weight, text))

    viewed = [first]
    emit(first, VIEW, query)
    for _ in range(rng.choice([0, 1, 2, 3], [0.3, 0.35, 0.2, 0.15])):
        alternative = shop.pick(
            rng, shop.by_type[first.kind.name], brand, {p.item_id for p in viewed}
        )
        if alternative.item_id not in {p.item_id for p in viewed}:
            viewed.append(alternative)
            emit(alternative, VIEW, query)
    if not rng.chance(0.5):
        return events
    chosen = rng.choice(viewed, [p.popularity * (3.0 if p.brand == brand else 1.0) for p in viewed])
    emit(chosen, CART)
    if rng.chance(0.65):
        emit(chosen, PURCHASE)
    if chosen.kind.accessories and rng.chance(0.7):
        kind = rng.choice(chosen.kind.accessories)
        accessory = shop.pick(rng, shop.by_type[kind], chosen.brand, set())
        emit(accessory, VIEW)
        if rng.chance(0.4):
            emit(accessory, CART)
            if rng.chance(0.7):
                emit(accessory, PURCHASE)
    return events


def make_interactions(rng: Rng, products: list[Product]) -> list[Event]:
    """All users' sessions spread over the window, as one log ordered by time."""
    shop = Shop(products)
    events: list[Event] = []
    for user in make_users(rng):
        starts = sorted(START_EPOCH + rng.integer(0, WINDOW_SECONDS) for _ in range(user.sessions))
        for start in starts:
            events.extend(simulate_session(rng, shop, user, start, exploring=rng.chance(0.1)))
    events.sort(key=lambda e: (e.timestamp, e.user_id))
    return events


# -- search queries -------------------------------------------------------------------------------


def make_queries(products: list[Product]) -> list[dict[str, object]]:
    """Each type's search phrases with the items of that type as relevant, split like MovieLens tags."""
    by_query: dict[str, list[str]] = {}
    for p in products:
        for query in p.kind.queries:
            by_query.setdefault(query, []).append(p.item_id)
    return [
        {
            "query": query,
            "item_ids": ids,
            "split": "test" if hashlib.md5(query.encode()).digest()[0] % 2 else "train",
        }
        for query, ids in sorted(by_query.items())
    ]


# -- files ----------------------------------------------------------------------------------------


def generate(out_dir: Path, seed: int = 7) -> tuple[Path, Path]:
    """Writes catalog.csv, interactions.csv (and queries.jsonl) into out_dir; same seed, same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = Rng(seed)
    products = make_catalog(rng)
    events = make_interactions(rng, products)
    catalog_path, interactions_path = out_dir / CATALOG_FILE, out_dir / INTERACTIONS_FILE
    _write_csv(
        catalog_path,
        ["item_id", "title", "description", "category", "brand", "price"],
        [[p.item_id, p.title, p.description, p.category, p.brand, p.price] for p in products],
    )
    _write_csv(
        interactions_path,
        ["user_id", "item_id", "timestamp", "weight", "query"],
        [[e.user_id, e.item_id, str(e.timestamp), str(e.weight), e.query] for e in events],
    )
    with (out_dir / QUERIES_FILE).open("w", encoding="utf-8", newline="\n") as handle:
        for record in make_queries(products):
            handle.write(json.dumps(record) + "\n")
    return catalog_path, interactions_path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    # "\n" line ends regardless of platform, so the committed bytes compare equal everywhere.
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def sample_paths() -> tuple[Path, Path]:
    """The packaged sample (catalog.csv, interactions.csv)."""
    return SAMPLE_DIR / CATALOG_FILE, SAMPLE_DIR / INTERACTIONS_FILE


def sample_queries_path() -> Path:
    """The packaged sample's search queries (JSON lines, the MovieLens queries.jsonl shape)."""
    return SAMPLE_DIR / QUERIES_FILE


if __name__ == "__main__":
    catalog, interactions = generate(SAMPLE_DIR)
    print(f"wrote {catalog}, {interactions} and {SAMPLE_DIR / QUERIES_FILE}")
