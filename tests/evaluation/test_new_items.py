"""`recsys evaluate --protocol new-items`: which products are held out, what the build sees
without them, the refusal of a bundle that has seen them, and the report. On a slice of the real
Amazon Scientific files; the served path it measures is tested in tests/integration (a product
upserted after the build recommended from its text)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from recsys.app.amazon import convert_amazon_scientific
from recsys.app.build import BuildOptions
from recsys.app.cli import main
from recsys.app.evaluation.new_items import (
    HELD_OUT_EVERY,
    goals,
    held_out,
    new_items_bundle,
    without_new,
)
from recsys.app.evaluation.report import markdown
from recsys.app.evaluation.runner import EvalData, load_data
from recsys.core.errors import InvalidInput
from tests.recsys.amazon_helpers import amazon_slice
from tests.retrieval.conftest import write_retrieval_version

pytestmark = pytest.mark.amazon


@pytest.fixture(scope="module")
def data(amazon_scientific_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    folder = amazon_slice(amazon_scientific_dir, tmp_path_factory.mktemp("raw"), range(300))
    out = tmp_path_factory.mktemp("amazon-dir")
    convert_amazon_scientific(folder, out)
    return load_data(out)


def test_about_one_product_in_twenty_is_held_out_by_its_id(data: EvalData) -> None:
    ids = [str(i) for i in data.inputs.catalog["item_id"]]
    new = [i for i in ids if held_out(i)]
    assert abs(len(new) / len(ids) - 1 / HELD_OUT_EVERY) < 0.015
    assert [i for i in ids if held_out(i)] == new  # the same products every run


def test_the_build_sees_no_interaction_with_a_new_product_and_test_stays_whole(
    data: EvalData,
) -> None:
    new = {str(i) for i in data.inputs.catalog["item_id"] if held_out(str(i))}
    split = without_new(data.split, new)
    for part in (split.train, split.validation):
        assert not part["item_id"].astype(str).isin(new).any()
    assert len(split.test) == len(data.split.test)
    dropped = len(data.split.train) - len(split.train)
    assert dropped == data.split.train["item_id"].astype(str).isin(new).sum() > 0


def test_a_bundle_that_has_seen_the_products_is_refused(
    data: EvalData, catalog: pd.DataFrame, tmp_path: Path
) -> None:
    write_retrieval_version(tmp_path, catalog, "v1")  # a real bundle, built with every product
    options = BuildOptions(Path("c.csv"), Path("i.csv"), tmp_path)
    with pytest.raises(InvalidInput, match="not built without the held-out products"):
        new_items_bundle(data, tmp_path, options, {"x"})


def test_the_cli_offers_the_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "new-items" in capsys.readouterr().out


def test_the_report_shows_both_groups_and_the_goals() -> None:
    def scores(ndcg: float) -> dict[str, float]:
        return {"ndcg@10": ndcg, "recall@10": ndcg * 2, "mrr@10": ndcg}

    section = {
        "held_out": "products whose md5(item id) first byte divides by 20",
        "products": 210,
        "catalog": 4385,
        "users": {"new": 40, "others": 900},
        "methods": {
            "new": {"popular": scores(0.0), "text_knn": scores(0.05), "full": scores(0.06)},
            "others": {"popular": scores(0.02), "text_knn": scores(0.06), "full": scores(0.09)},
        },
        "full new / others": 0.667,
        "full / text_knn on new": {"ratio": 1.2, "low": 0.9, "high": 1.5},
        "text_knn": {"chosen": {"window": 3, "decay": 0.7, "ndcg@10": 0.06}, "validation": []},
    }
    met = goals(section)
    assert list(met.values()) == [True, True]
    text = markdown({"new_items": section, "goals": met})
    assert "## New products (210 of 4385 held out of the build)" in text
    assert "### 40 users whose test item is a new product" in text
    assert "### 900 users whose test item the build knew" in text and "window 3, decay 0.7" in text
    worse = {**section, "full new / others": 0.4}
    assert not goals(worse)["new products: full >= 0.5x the other users"]
