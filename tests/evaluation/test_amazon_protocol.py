"""The leave-one-out protocol `recsys evaluate` runs on a converted Amazon Scientific DIR: the
dispatch on dataset.json, the split, the relevance rule, the marks its bundles carry. On a slice
of the real files; the models themselves are exercised by test_evaluate.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from recsys.app.amazon import DATASET, PUBLISHED, convert_amazon_scientific
from recsys.app.build import BuildOptions
from recsys.app.cli import main
from recsys.app.evaluation import recommend
from recsys.app.evaluation.baselines import validation_users
from recsys.app.evaluation.report import markdown
from recsys.app.evaluation.runner import (
    AMAZON_GRIDS,
    FIT_ON,
    EvalData,
    amazon_goals,
    for_dataset,
    load_data,
)
from recsys.core.errors import InvalidInput
from recsys.offline.splits import RELEVANT_MIN_RATING, relevant_items
from tests.recsys.amazon_helpers import amazon_slice

pytestmark = pytest.mark.amazon

USERS = 30


@pytest.fixture(scope="module")
def data_dir(amazon_scientific_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = amazon_slice(amazon_scientific_dir, tmp_path_factory.mktemp("raw"), range(USERS))
    out = tmp_path_factory.mktemp("amazon-dir")
    convert_amazon_scientific(folder, out)
    return out


@pytest.fixture(scope="module")
def data(data_dir: Path) -> EvalData:
    return load_data(data_dir)


@pytest.fixture(scope="module")
def sequences(data_dir: Path) -> dict[str, list[str]]:
    """Each user's whole sequence, read from interactions.csv in file order."""
    frame = pd.read_csv(data_dir / "interactions.csv", dtype=str)
    return {str(u): list(g["item_id"]) for u, g in frame.groupby("user_id", sort=False)}


def test_dataset_json_selects_the_leave_one_out_protocol(data: EvalData) -> None:
    assert data.dataset == DATASET and data.published == PUBLISHED
    assert data.queries == [] and data.grids == AMAZON_GRIDS
    # Every held-out item is relevant: weight 1 would fail MovieLens's "rated 4 or more".
    assert data.split.relevant_min_weight is None
    assert relevant_items(data.split.test, RELEVANT_MIN_RATING) == {}
    assert "history" in data.protocol and "4,385 products" in data.protocol
    # The build sees the train part only.
    assert data.inputs.interactions.equals(data.split.train)


def test_last_item_is_test_second_last_validation(
    data: EvalData, sequences: dict[str, list[str]]
) -> None:
    split = data.split
    assert len(split.test) == len(split.validation) == USERS
    assert len(split.train) == sum(len(s) for s in sequences.values()) - 2 * USERS
    test = dict(zip(split.test["user_id"], split.test["item_id"], strict=True))
    validation = dict(zip(split.validation["user_id"], split.validation["item_id"], strict=True))
    for user, sequence in sequences.items():
        assert (validation[user], test[user]) == (sequence[-2], sequence[-1])
        train = split.train[split.train["user_id"] == user]
        assert list(train.sort_values("timestamp")["item_id"]) == sequence[:-2]


def test_every_user_is_scored_on_their_test_item_from_everything_before(
    data: EvalData, sequences: dict[str, list[str]]
) -> None:
    cases = recommend.cases(data.split)
    assert len(cases) == USERS
    for case in cases:
        sequence = sequences[case.user_id]
        assert case.relevant == {sequence[-1]}
        assert case.history == sequence[-2::-1]  # most recent first, validation item first


def test_validation_users_are_asked_from_train_for_their_validation_item(
    data: EvalData, sequences: dict[str, list[str]]
) -> None:
    held = validation_users(data.split)
    assert len(held.relevant) == USERS
    for user, relevant in held.relevant.items():
        assert relevant == {sequences[user][-2]}
        assert held.histories[user] == sequences[user][-3::-1]


def test_bundles_for_amazon_carry_their_own_mark_and_relevance_rule(
    data: EvalData, data_dir: Path
) -> None:
    base = BuildOptions(data_dir / "catalog.csv", data_dir / "interactions.csv", data_dir / "b")
    protocol = for_dataset(replace_split(base, FIT_ON["protocol"]), data)
    assert (protocol.split, protocol.relevant_min_weight) == (f"{DATASET}-train", None)
    own = for_dataset(replace_split(base, FIT_ON["own-holdout"]), data)
    assert own.split == f"{DATASET}-before-test"
    movielens = EvalData(data.inputs, data.split, [])
    assert (
        for_dataset(replace_split(base, FIT_ON["protocol"]), movielens).split == "movielens-train"
    )


def replace_split(options: BuildOptions, split: str) -> BuildOptions:
    return replace(options, split=split)


def test_splits_csv_that_disagrees_with_the_interactions_is_refused(
    data_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "dir"
    broken.mkdir()
    for name in ("catalog.csv", "interactions.csv", "dataset.json"):
        (broken / name).write_bytes((data_dir / name).read_bytes())
    splits = pd.read_csv(data_dir / "splits.csv", dtype=str)
    splits.loc[2, "test_item_id"] = splits.loc[2, "validation_item_id"]
    splits.to_csv(broken / "splits.csv", index=False)
    with pytest.raises(InvalidInput, match=r"splits\.csv row 3: user \S+'s test item is"):
        load_data(broken)
    (broken / "splits.csv").unlink()
    with pytest.raises(InvalidInput, match=r"splits\.csv: missing; create DIR with `recsys"):
        load_data(broken)


@pytest.mark.parametrize(
    ("marker", "says"),
    [('{"dataset": "scifact-x"}', "unknown dataset 'scifact-x'"), ("{", "not a dataset marker")],
)
def test_an_unknown_or_broken_marker_is_refused(tmp_path: Path, marker: str, says: str) -> None:
    (tmp_path / "dataset.json").write_text(marker)
    with pytest.raises(InvalidInput, match=says):
        load_data(tmp_path)


def test_search_protocol_is_refused_before_anything_is_built(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = tmp_path / "bundle", tmp_path / "report"
    argv = ["evaluate", "--data", str(data_dir), "--bundle", str(root), "--out", str(out)]
    assert main([*argv, "--protocol", "search"]) == 2
    assert "has no queries to search with" in capsys.readouterr().err
    for flag in ("--users", "--ce-users"):
        assert main([*argv, flag, "0"]) == 2
        assert f"{flag} 0: must be >= 1" in capsys.readouterr().err
    assert not root.exists() and not out.exists()


def test_published_figures_are_printed_as_published_and_checked_as_goals() -> None:
    full = {"ndcg@10": 0.08, "recall@10": 0.1, "mrr@10": 0.07}
    without_lm = {
        "variant": "without language-model components",
        "test full / variant refitted": {"ratio": 1.084},
    }
    report = {
        "recommend": {
            "users": 1,
            "methods": {"full": full},
            "published": PUBLISHED,
            "ablation": {"rows": [without_lm]},
        },
        "unseen": {"methods": {"full": {"ndcg@10": 0.06}, "popular": {"ndcg@10": 0.02}}},
    }
    assert amazon_goals(report) == {
        "recommend: full ndcg@10 >= 0.102": False,
        "recommend: full ndcg@10 > best published (0.0753)": True,
        "recommend: language-model components raise test ndcg@10 >= 10% (ablation, refitted)": (
            False
        ),
        "unseen users: full ndcg@10 >= 3 x popular": True,
    }
    md = markdown({"recommend": {k: v for k, v in report["recommend"].items() if k != "ablation"}})
    assert "NOT measured here" in md
    for name, values in PUBLISHED.items():
        assert f"| {name} (published) | {values['ndcg@10']:.4f} |" in md
