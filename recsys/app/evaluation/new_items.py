"""Products added after the build: a share of the catalog is held out of the build entirely
(catalog, interactions, fusion fitting), then added with the retrieval service's upsert (what
UpsertItems runs: encoded from their text, indexed, journaled), and the test users whose next item
is one of them are answered by the served ranker next to the other test users.

Text-only nearest neighbours over the whole catalog, new products included, is the baseline on
the same cases: it reads no interactions, so it is as blind to a product's age as a recommender
can be.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from recsys.app.build import BuildOptions, build_bundle
from recsys.app.evaluation import recommend
from recsys.app.evaluation.ablation import VARIANTS, rank_top
from recsys.app.evaluation.baselines import (
    DEFAULT_GRIDS,
    Grids,
    ItemText,
    TextNeighbours,
    text_configs,
    validation_users,
)
from recsys.app.evaluation.metrics import BOOTSTRAP_DRAWS, accuracy, paired_bootstrap_ratio
from recsys.app.evaluation.metrics import per_query_ndcg as ndcgs
from recsys.app.evaluation.models import EvalModels, marked_bundle
from recsys.app.evaluation.runner import EvalData, for_dataset
from recsys.app.ingest import IngestReport, catalog_items
from recsys.core.bundle import Bundle
from recsys.core.errors import InvalidInput
from recsys.offline.local import gather_pools, pool_request
from recsys.offline.splits import Split

HELD_OUT_EVERY = 20  # a product is held out when the first byte of md5(item id) divides by this
METHODS = ("popular", "text_knn", "full")
# The goal: the new products' users get at least this share of the others' NDCG@10.
NEW_OVER_OTHERS = 0.5


def held_out(item_id: str) -> bool:
    return hashlib.md5(item_id.encode()).digest()[0] % HELD_OUT_EVERY == 0


def split_mark(dataset: str) -> str:
    """What a bundle built for this protocol records as its split."""
    return f"{dataset}-train-without-new-products"


def without_new(split: Split, new: set[str]) -> Split:
    """The split without any interaction with the held-out products, test kept whole."""

    def kept(part: Any) -> Any:
        return part[~part["item_id"].astype(str).isin(new)]

    return replace(split, train=kept(split.train), validation=kept(split.validation))


def new_items_bundle(data: EvalData, root: Path, options: BuildOptions, new: set[str]) -> Bundle:
    """Opens ROOT if it was built for this protocol; otherwise builds it there from the train
    split without the held-out products (catalog and interactions), fitted on the protocol's
    validation without them."""
    mark = split_mark(data.dataset)
    bundle = marked_bundle(root, [mark], "without the held-out products")
    if bundle is not None:
        return bundle
    split = without_new(data.split, new)
    catalog = data.inputs.catalog[~data.inputs.catalog["item_id"].astype(str).isin(new)]
    report = IngestReport(len(split.train), len(split.train), 0, ())
    inputs = replace(data.inputs, catalog=catalog, interactions=split.train, report=report)
    options = replace(for_dataset(options, data), split=mark)
    return build_bundle(options, inputs=inputs, validation=split.validation)


def run_new_items(
    data: EvalData,
    bundle_root: Path,
    options: BuildOptions,
    pool: int | None,
    progress: bool,
    grids: Grids = DEFAULT_GRIDS,
) -> dict[str, Any]:
    """The new-products section of the report."""
    catalog_ids = [str(i) for i in data.inputs.catalog["item_id"]]
    new = {i for i in catalog_ids if held_out(i)}
    if not new:
        raise InvalidInput(f"--protocol new-items: no product of {len(catalog_ids)} is held out")
    bundle = new_items_bundle(data, bundle_root, options, new)
    models = EvalModels.load(bundle, device=options.device)
    pool = pool or models.pool
    catalog = data.inputs.catalog
    models.retriever.upsert(catalog_items(catalog[catalog["item_id"].astype(str).isin(new)]))
    split = without_new(data.split, new)
    cases = [c for c in recommend.cases(data.split) if c.history]
    groups = {
        "new": [c for c in cases if c.relevant & new],
        "others": [c for c in cases if not c.relevant & new],
    }
    requests = [
        pool_request(pool, history=c.history[: recommend.HISTORY_ITEMS], exclude=c.history)
        for c in cases
    ]
    desc = "new products: candidates" if progress else None
    pools = gather_pools(requests, models.retriever, models.ranker, models.policy, desc)
    full = dict(
        zip(
            (c.user_id for c in cases),
            rank_top(models, models.ranker, pools, VARIANTS[0], progress),
            strict=True,
        )
    )
    text, text_tuning = _text_neighbours(models, split, grids, sorted(new))
    popular = recommend.popularity_order(split.seen())
    methods: dict[str, dict[str, Any]] = {}
    per_user: dict[str, dict[str, np.ndarray]] = {}
    for group, members in groups.items():
        relevant = {c.user_id: c.relevant for c in members}
        runs = {
            "popular": {
                c.user_id: recommend.top_k_excluding(popular, set(c.history)) for c in members
            },
            "text_knn": {c.user_id: text.recommend(c.history, 10, set(c.history)) for c in members},
            "full": {c.user_id: full[c.user_id] for c in members},
        }
        methods[group] = {name: accuracy(relevant, runs[name]) for name in METHODS}
        per_user[group] = {name: ndcgs(relevant, runs[name]) for name in METHODS}
    full_new, full_others = (methods[g]["full"]["ndcg@10"] for g in ("new", "others"))
    return {
        "held_out": f"products whose md5(item id) first byte divides by {HELD_OUT_EVERY}",
        "products": len(new),
        "catalog": len(catalog_ids),
        "users": {group: len(members) for group, members in groups.items()},
        "methods": methods,
        "full new / others": round(full_new / full_others, 3) if full_others else None,
        "full / text_knn on new": paired_bootstrap_ratio(
            per_user["new"]["full"], per_user["new"]["text_knn"], BOOTSTRAP_DRAWS
        ),
        "text_knn": text_tuning,
        "fusion": models.bundle.manifest.get("fusion", {}),
        "bundle": str(bundle.path),
    }


def goals(section: dict[str, Any]) -> dict[str, bool]:
    new = section["methods"]["new"]
    ratio = section["full new / others"]
    return {
        f"new products: full >= {NEW_OVER_OTHERS}x the other users": ratio is not None
        and ratio >= NEW_OVER_OTHERS,
        "new products: full above text-only neighbours": new["full"]["ndcg@10"]
        > new["text_knn"]["ndcg@10"],
    }


def _text_neighbours(
    models: EvalModels, split: Split, grids: Grids, new: list[str]
) -> tuple[TextNeighbours, dict[str, Any]]:
    """Text-only neighbours over the bundle's vectors and the added products' (as retrieval
    holds them), window and decay chosen on the validation users."""
    base = ItemText.of_bundle(models.bundle.path)
    added, _ = models.retriever.get_items(new)
    text = ItemText(
        base.item_ids + [item.item_id for item, _ in added],
        np.vstack([base.vectors, *[v[None, :] for _, v in added]]).astype(np.float32),
    )
    users = validation_users(split)
    rows = []
    for config in text_configs(grids):
        model = TextNeighbours(text, config["window"], config["decay"])
        rows.append({**config, "ndcg@10": round(users.ndcg(model), 4)})
    best = max(rows, key=lambda r: r["ndcg@10"])
    return TextNeighbours(text, best["window"], best["decay"]), {"chosen": best, "validation": rows}
