"""`recsys evaluate` end to end on small real data: the sample shop with ratings attached."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from ranking_service.cf import ALSParams
from ranking_service.distill import DistillConfig
from ranking_service.train import RankerTrainConfig
from recsys.app.build import BuildOptions
from recsys.app.cli import main
from recsys.app.evaluation import recommend, search
from recsys.app.evaluation.ablation import VARIANTS
from recsys.app.evaluation.baselines import (
    NAMES,
    Grids,
    ItemText,
    SASRecConfig,
    tuned_baselines,
)
from recsys.app.evaluation.models import EvalModels
from recsys.app.evaluation.runner import (
    FIT_ON,
    SPLIT_MARK,
    load_data,
    run_evaluation,
    sample_of,
    sampled_test_users,
    train_split_bundle,
)
from recsys.app.evaluation.unseen import METHODS as UNSEEN_METHODS
from recsys.app.evaluation.unseen import held_out, run_unseen, without_held_out
from recsys.app.sample import sample_paths
from recsys.core.bundle import Bundle

USERS = 60  # of the sample's 200: enough for every method to answer, quick to score
# Small validation searches: the shape of the tuning, not its outcome, is under test here.
GRIDS = Grids(
    windows=(5, 10),
    lambdas=(100.0,),
    neighbours=(20,),
    shrinks=(0.0, 10.0),
    sasrec=SASRecConfig(dim=16, max_len=20, negatives=32, max_epochs=2, eval_every=1),
    text_windows=(1, 3),
    text_decays=(1.0, 0.5),
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample catalog, queries, and the interactions of USERS users rated 1..5."""
    catalog, interactions = sample_paths()
    out = tmp_path_factory.mktemp("eval-data")
    shutil.copy(catalog, out / "catalog.csv")
    shutil.copy(catalog.parent / "queries.jsonl", out / "queries.jsonl")
    log = pd.read_csv(interactions, dtype={"user_id": str, "item_id": str})
    log = log[log["user_id"].isin(sorted(log["user_id"].unique())[:USERS])].copy()
    log["weight"] = [float(1 + (i * 7) % 5) for i in range(len(log))]  # ratings 1..5
    log.to_csv(out / "interactions.csv", index=False)
    return out


@pytest.fixture(scope="module")
def evaluated(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle root, report dir) of one `recsys evaluate --protocol all` run."""
    root = tmp_path_factory.mktemp("eval-bundle") / "bundle"
    out = tmp_path_factory.mktemp("eval-report")
    options = BuildOptions(
        catalog=data_dir / "catalog.csv",
        interactions=data_dir / "interactions.csv",
        out=root,
        ranker=RankerTrainConfig(steps=6, batch_size=8, max_length=64, validation_users=12),
        student=DistillConfig(steps=10, batch_size=16),
        fusion_lists=30,
        device="cpu",
        split=SPLIT_MARK,
    )
    run_evaluation(data_dir, root, "all", out, options, pool=20, progress=False, grids=GRIDS)
    return root, out


def test_report_has_the_promised_shape(evaluated: tuple[Path, Path]) -> None:
    root, out = evaluated
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    rec, srch = report["recommend"], report["search"]
    assert list(rec["methods"]) == list(recommend.METHODS)
    assert list(srch["methods"]) == list(search.METHODS)
    for values in rec["methods"].values():
        assert set(values) == {"ndcg@10", "recall@10", "mrr@10", "coverage@10", "diversity@10"}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    for values in srch["methods"].values():
        assert set(values) == {"ndcg@10", "recall@10", "mrr@10"}
    assert 0 < rec["users"] <= USERS and srch["queries"] > 0
    assert [row["diversity"] for row in rec["diversity_sweep"]] == [0.0, 0.25, 0.5, 0.75]
    assert report["goals"] and all(isinstance(v, bool) for v in report["goals"].values())
    md = (out / "report.md").read_text()
    for section in ("## Recommend", "### CF (ALS)", "### Baselines", "### Ablation"):
        assert section in md
    assert "paired bootstrap" in md and "- cf / popular, test NDCG@10" in md
    # cf / popular is the ratio of the two methods' reported NDCG@10.
    ndcg = {m: rec["methods"][m]["ndcg@10"] for m in ("cf", "popular")}
    ratio = rec["cf"]["cf / popular"]
    assert ratio["ratio"] == pytest.approx(ndcg["cf"] / ndcg["popular"], rel=1e-6)
    assert ratio["low"] <= ratio["ratio"] <= ratio["high"]
    assert rec["cf"]["params"] == ALSParams.of(Bundle.open(root).manifest["cf"]).kwargs()
    for chart in ("recommend.png", "search.png", "unseen.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baselines_are_tuned_on_validation_and_recorded(evaluated: tuple[Path, Path]) -> None:
    _, out = evaluated
    tuning = json.loads((out / "report.json").read_text())["recommend"]["baselines"]
    assert tuning["validation_users"] > 0
    for name in NAMES:
        rows = tuning[name]["validation"]
        assert tuning[name]["chosen"]["ndcg@10"] == max(r["ndcg@10"] for r in rows)
    assert [r["window"] for r in tuning["cf_recent"]["validation"]] == [5, 10]
    assert len(tuning["itemknn"]["validation"]) == 2
    assert [r["epochs"] for r in tuning["sasrec"]["validation"]] == [1, 2]
    # Window 1 has nothing older to fade: one decay there.
    assert [(r["window"], r["decay"]) for r in tuning["text_knn"]["validation"]] == [
        (1, 1.0),
        (3, 1.0),
        (3, 0.5),
    ]


def test_bootstrap_compares_full_with_every_other_method(evaluated: tuple[Path, Path]) -> None:
    _, out = evaluated
    report = json.loads((out / "report.json").read_text())
    for protocol, methods in (("recommend", recommend.METHODS), ("search", search.METHODS)):
        boot = report[protocol]["bootstrap"]
        assert list(boot["full / each"]) == [m for m in methods if m != "full"]
        ndcg = {m: v["ndcg@10"] for m, v in report[protocol]["methods"].items()}
        assert boot["best_other"] == max((m for m in ndcg if m != "full"), key=ndcg.__getitem__)
        best = boot["full / best other"]
        assert best == boot["full / each"][boot["best_other"]]
        assert best["low"] <= best["ratio"] <= best["high"] and best["draws"] == 1000


def test_ablation_starts_from_the_reported_pipeline(evaluated: tuple[Path, Path]) -> None:
    """Its `full` row on test is the report's `full`: the variants differ only by what they drop."""
    _, out = evaluated
    rec = json.loads((out / "report.json").read_text())["recommend"]
    rows = rec["ablation"]["rows"]
    assert isinstance(rec["ablation"]["cross_encoder_in_plan"], bool)
    assert [r["variant"] for r in rows] == [v.name for v in VARIANTS]
    assert rows[0]["test ndcg@10"] == pytest.approx(rec["methods"]["full"]["ndcg@10"], abs=1e-4)
    for row in rows[1:]:
        assert 0.0 <= row["validation ndcg@10"] <= 1.0
        assert 0.0 <= row["test ndcg@10 refitted"] <= 1.0
        for ratio in (row["test full / variant"], row["test full / variant refitted"]):
            assert ratio["low"] <= ratio["high"]
    assert "test ndcg@10, refitted" in (out / "report.md").read_text()


def test_unseen_users_are_answered_without_ever_being_trained_on(
    data_dir: Path, evaluated: tuple[Path, Path]
) -> None:
    root, out = evaluated
    report = json.loads((out / "report.json").read_text())
    unseen = report["unseen"]
    assert list(unseen["methods"]) == list(UNSEEN_METHODS)
    assert unseen["users"] > 0 and isinstance(unseen["cross_encoder_in_plan"], bool)
    # The recommend protocol's chosen window is the one short-term CF uses here.
    chosen = report["recommend"]["baselines"]["cf_recent"]["chosen"]["window"]
    assert unseen["cf_recent_window"] == chosen
    assert "unseen users: full ndcg@10 >= 2 x popular" in report["goals"]
    assert "unseen users: full ndcg@10 >= 1.5 x popular" in report["goals"]
    # The reference: the same requests answered by the bundle trained with these users.
    reference = unseen["reference"]
    seen = reference["full, users seen at training"]["ndcg@10"]
    ratio = reference["unseen / seen"]
    assert 0.0 <= seen <= 1.0 and ratio["low"] <= ratio["ratio"] <= ratio["high"]
    if seen > 0:
        assert ratio["ratio"] == pytest.approx(unseen["methods"]["full"]["ndcg@10"] / seen, 1e-3)
    assert "## Unseen users" in (out / "report.md").read_text()
    assert "Reference, not a competitor" in (out / "report.md").read_text()
    assert (out / "unseen.png").is_file()
    data = load_data(data_dir)
    visible = data.split.seen()
    training = without_held_out(visible)
    held = set(visible["user_id"]) - set(training["user_id"])
    assert held and all(held_out(u) for u in held)
    assert unseen["fitted_on_interactions"] == len(training)
    models = EvalModels.load(Bundle.open(root), device="cpu")
    assert all(models.ranker_refitted_on(training).cf.user_vector(u) is None for u in held)
    runs, relevant, _ = run_unseen(models, data.split, 20, chosen, False)
    assert relevant and all(held_out(u) for u in relevant)
    assert set(relevant) & held  # some of them have a history to be answered from
    for user in set(relevant) & held:
        assert len(runs["full"][user]) == 10 and runs["cf"][user]
        history = set(visible.loc[visible["user_id"] == user, "item_id"])
        assert not any(set(run[user]) & history for run in runs.values())


def test_a_sample_of_test_users_keeps_train_and_validation_whole(data_dir: Path) -> None:
    split = load_data(data_dir).split
    users = split.test["user_id"].nunique()
    sample = sampled_test_users(split, 7, seed=3)
    assert sample.test["user_id"].nunique() == 7
    assert set(sample.test["user_id"]) < set(split.test["user_id"])
    # Every test interaction of a sampled user, none of another's.
    chosen = split.test[split.test["user_id"].isin(set(sample.test["user_id"]))]
    assert len(sample.test) == len(chosen)
    assert sample.train is split.train and sample.validation is split.validation
    assert set(sampled_test_users(split, 7, seed=3).test["user_id"]) == set(sample.test["user_id"])
    assert sampled_test_users(split, users, seed=3) is split
    assert sampled_test_users(split, None, seed=3) is split


def test_the_cross_encoder_baselines_answer_only_their_sample(
    data_dir: Path, evaluated: tuple[Path, Path]
) -> None:
    root, _ = evaluated
    split = load_data(data_dir).split
    models = EvalModels.load(Bundle.open(root), device="cpu")
    users = set(split.test["user_id"].astype(str))
    sample = sample_of(users, 5, seed=0)
    assert sample is not None and len(sample) == 5
    runs, cases, _ = recommend.run_recommend(models, split, 20, False, None, sample)
    answered = {c.user_id for c in cases if c.history}
    for name in recommend.CROSS_ENCODER_BASELINES:
        assert set(runs[name]) == sample & {c.user_id for c in cases}
    assert answered - sample and all(len(runs["full"][u]) == 10 for u in answered)
    assert sample_of(users, len(users), seed=0) is None


def test_bundle_saw_only_the_train_split(data_dir: Path, evaluated: tuple[Path, Path]) -> None:
    root, _ = evaluated
    data = load_data(data_dir)
    manifest = Bundle.open(root).manifest
    assert manifest["settings"]["split"] == SPLIT_MARK
    # Fitted on the train split, fusion on validation, CF refitted on both: never on test.
    assert manifest["counts"]["interactions"] == len(data.split.seen())
    assert manifest["validation"]["interactions"] == len(data.split.validation)
    # Fusion was fitted on held-out data, one model per request kind.
    assert manifest["fusion"]["kind"] == "by_context"


def test_no_answer_contains_the_users_history(data_dir: Path, evaluated: tuple[Path, Path]) -> None:
    root, _ = evaluated
    data = load_data(data_dir)
    models = EvalModels.load(Bundle.open(root), device="cpu")
    cf = ALSParams.of(models.bundle.manifest["cf"]).kwargs()
    text = ItemText.of_bundle(models.bundle.path)
    baselines, _ = tuned_baselines(data.split, cf, GRIDS, text=text)
    runs, cases, _ = recommend.run_recommend(models, data.split, 20, False, baselines)
    assert set(runs) == set(recommend.METHODS) and cases
    for case in cases:
        for method, run in runs.items():
            answer = run[case.user_id]
            assert not set(answer) & set(case.history), (method, case.user_id)
            assert len(set(answer)) == len(answer) <= 10
        assert len(runs["popular"][case.user_id]) == 10
        # Only a user without any history (all of it in test) leaves the pipeline speechless.
        assert len(runs["full"][case.user_id]) == 10 or not case.history


def test_a_bundle_not_built_from_the_train_split_is_refused(
    data_dir: Path, sample_bundle_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", "--data", str(data_dir), "--bundle", str(sample_bundle_root)]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "not built from the movielens train split" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path), "--pool", "5"]) == 2
    assert "--pool 5" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_own_holdout_builds_as_a_plain_build_from_everything_before_test(
    data_dir: Path, tmp_path: Path
) -> None:
    """`--fit-on own-holdout`: the bundle a plain `recsys build` makes of the data before test
    (its own hold-out, no queries), evaluated on the same test users."""
    root, out = tmp_path / "bundle", tmp_path / "report"
    options = BuildOptions(
        catalog=data_dir / "catalog.csv",
        interactions=data_dir / "interactions.csv",
        out=root,
        ranker=RankerTrainConfig(steps=4, batch_size=8, max_length=64, validation_users=12),
        student=None,
        fusion_lists=30,
        device="cpu",
        split=FIT_ON["own-holdout"],
    )
    report = run_evaluation(
        data_dir, root, "recommend", out, options, pool=20, progress=False, grids=GRIDS
    )
    data = load_data(data_dir)
    manifest = Bundle.open(root).manifest
    assert manifest["counts"]["interactions"] == len(data.split.seen())
    assert manifest["validation"]["source"].startswith("each user's most recent")
    assert manifest["validation"]["relevant_min_weight"] is None
    # The sample logs queries in its interactions: searches fit on the build's own held-out ones.
    assert "fallback" not in manifest["fusion"]["query"]["fitted_on"]
    assert report["meta"]["fit_on"] == "own-holdout"
    assert report["recommend"]["users"] > 0
    # The bundle never saw test, so evaluate accepts it again as it is, without building.
    again = train_split_bundle(data, root, options)
    assert str(again.path) == report["meta"]["bundle"]
    assert len([p for p in root.iterdir() if p.is_dir()]) == 1
