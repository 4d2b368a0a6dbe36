"""recsys.app.build: a build takes its candidate pool and CF share from its options only, and
learns its ranking from interactions it held out itself.

Offline numbers must describe the pool serving ranks with the options the build was given,
so RECSYS_* variables (a serving process's settings) must never change what a build does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ranking_service.cf import WEIGHTINGS, ALSParams, CFModel
from ranking_service.copies import DIRS
from ranking_service.copy_choice import INT8_TOLERANCE, STUDENT_KEEPS, STUDENT_MIN_SPEARMAN
from ranking_service.fusion import load_fusion, reads
from ranking_service.fusion_fit import DEPTHS, MIN_LISTS
from ranking_service.item_item import ItemItem
from ranking_service.text_sequence import TextSequence
from ranking_service.train import RankerTrainConfig
from recsys.app.build import BuildOptions, build_bundle
from recsys.app.build_steps import COPIES_SKIPPED
from recsys.app.ingest import load_interactions
from recsys.app.sample import sample_paths
from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle
from recsys.offline.cf_search import GRID, LAMBDAS, MIN_USERS, search_cf
from recsys.offline.fitting import FUSION_QUERY_SHARE
from recsys.offline.splits import hold_out_recent

BUILT_IN_POOL = 100
BUILT_IN_CF_SHARE = 0.5
# What a serving deployment might export; a build must not pick these up.
SERVING_ENV = {"RECSYS_CF_CANDIDATE_SHARE": "0.9", "RECSYS_DEFAULT_CANDIDATE_POOL": "7"}


def sample_options(out: Path, **values: object) -> BuildOptions:
    catalog, interactions = sample_paths()
    return BuildOptions(catalog=catalog, interactions=interactions, out=out, **values)  # type: ignore[arg-type]


def test_build_options_defaults_ignore_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in SERVING_ENV.items():
        monkeypatch.setenv(name, value)
    options = sample_options(tmp_path)
    assert (options.candidate_pool, options.cf_candidate_share) == (
        BUILT_IN_POOL,
        BUILT_IN_CF_SHARE,
    )
    # Defaults fixed when the module is imported count too: import it afresh under that
    # environment.
    code = (
        "import json\n"
        "from recsys.app.build import BuildOptions\n"
        "from gateway.candidates import PoolPolicy\n"
        "o = BuildOptions(catalog='c', interactions='i', out='o')\n"
        "print(json.dumps([o.candidate_pool, o.cf_candidate_share, PoolPolicy().cf_share]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [
        BUILT_IN_POOL,
        BUILT_IN_CF_SHARE,
        BUILT_IN_CF_SHARE,
    ]


def test_the_manifest_records_the_pool_the_build_used(sample_bundle_root: Path) -> None:
    settings = Bundle.open(sample_bundle_root).manifest["settings"]
    assert settings["candidate_pool"] == BUILT_IN_POOL
    assert settings["cf_candidate_share"] == BUILT_IN_CF_SHARE


def test_every_bundle_file_is_readable_by_other_users(sample_bundle_root: Path) -> None:
    """The images serve as uid 10001, seldom the user who built the bundle."""
    for path in [sample_bundle_root, *sample_bundle_root.rglob("*")]:
        needed = 0o005 if path.is_dir() else 0o004  # others: read (+ search for directories)
        assert path.stat().st_mode & needed == needed, f"{path}: mode {path.stat().st_mode:o}"


def test_a_build_records_its_options_not_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in SERVING_ENV.items():
        monkeypatch.setenv(name, value)
    # No cross-encoder: the cheapest real build (encoder, index, CF, fusion, manifest).
    queries = sample_paths()[1].parent / "queries.jsonl"
    bundle = build_bundle(
        sample_options(
            tmp_path / "bundle",
            ranker=None,
            candidate_pool=37,
            cf_candidate_share=0.25,
            queries=queries,
        )
    )
    manifest = Bundle.open(tmp_path / "bundle", bundle.version).manifest
    settings = manifest["settings"]
    assert (settings["candidate_pool"], settings["cf_candidate_share"]) == (37, 0.25)
    assert settings["queries"] == str(queries)
    # A share of the file's queries, held out, fits the search fusion with the logged ones.
    held_out = round(len(queries.read_text().splitlines()) * FUSION_QUERY_SHARE)
    assert manifest["fusion"]["query"]["fitted_on"]["lists"] >= held_out * 0.8


def test_every_build_fits_its_ranking_on_its_own_held_out_interactions(
    sample_bundle_root: Path,
) -> None:
    manifest = Bundle.open(sample_bundle_root).manifest
    validation = manifest["validation"]
    assert validation["interactions"] > 0 and validation["users"] > 0
    assert validation["source"].startswith("each user's most recent 10")
    history = manifest["fusion"]["history"]
    assert history["kind"] == "two_pass" and "fallback" not in history["fitted_on"]
    assert history["fitted_on"]["lists"] >= MIN_LISTS
    assert history["first"]["kind"] == history["second"]["kind"] == "logistic"
    sweep = history["fitted_on"]["sweep"]
    # Depths no copy could serve within the budget at the speed measured here are not swept.
    not_swept = history["fitted_on"].get("not_swept", {}).get("depths", [])
    assert sorted([row["depth"] for row in sweep] + not_swept) == sorted(DEPTHS)
    assert min(DEPTHS) not in not_swept
    assert history["rerank_depth"] in DEPTHS
    assert all(row["ms_per_request"] > 0 for row in sweep)
    # CF serves every interaction, the held-out ones included: it is refitted after fusion.
    assert manifest["cf"]["users"] == manifest["counts"]["users"]
    # The item-to-item model: lambda chosen on the validation users, served (its recall lists
    # were in the pools fusion was fitted on), its scores weighed where the gate found they pay.
    item_item = manifest["cf"]["item_item"]
    tried = item_item["search"]["tried"]
    assert [row["lambda"] for row in tried] == list(LAMBDAS)
    assert item_item["search"]["chosen"] == max(tried, key=lambda row: row["ndcg@10"])
    bundle = Bundle.open(sample_bundle_root)
    served = ItemItem.load(bundle.file(bundle_files.CF_DIR))
    assert served is not None and served.lam == item_item["lambda"]
    assert item_item["lambda"] == item_item["search"]["chosen"]["lambda"]
    fusion = load_fusion(bundle.file(bundle_files.FUSION))
    assert item_item["scores_weighed"] == reads(fusion, "item_item")
    if not history["fitted_on"]["item_to_item"]["pays"]:
        assert not reads(fusion.history, "item_item")
    # The text sequence model: trained on the training side's sequences, its epochs stopped
    # on the validation items, served from the version.
    sequence = manifest["text_sequence"]
    assert sequence["steps"] > 0 and sequence["held_out"] > 0
    assert 1 <= sequence["epochs"] <= len(sequence["held_out_loss"])
    assert TextSequence.load(bundle.path) is not None


def tiny_log(tmp_path: Path) -> tuple[Path, Path]:
    """(catalog, interactions) CSVs: 6 items, 3 users with 4 interactions each; too little to
    fit fusion on."""
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("item_id,title\n" + "".join(f"i{k},Item number {k}\n" for k in range(6)))
    interactions = tmp_path / "interactions.csv"
    rows = [(u, f"i{(u + k) % 6}", 1000 * k) for u in range(3) for k in range(4)]
    interactions.write_text(
        "user_id,item_id,timestamp\n" + "".join(f"u{u},{i},{t}\n" for u, i, t in rows)
    )
    return catalog, interactions


def test_too_little_data_to_fit_falls_back_to_the_convex_mix(tmp_path: Path) -> None:
    catalog, interactions = tiny_log(tmp_path)
    bundle = build_bundle(
        BuildOptions(catalog=catalog, interactions=interactions, out=tmp_path / "b", ranker=None)
    )
    fusion = bundle.manifest["fusion"]
    for kind in ("history", "query"):
        assert fusion[kind]["first"]["kind"] == "convex"
        assert (
            f"with a relevant candidate (need {MIN_LISTS})" in fusion[kind]["fitted_on"]["fallback"]
        )
    assert bundle.manifest["validation"]["interactions"] == 3 * 2  # half of each user's four


def test_a_pinned_precision_is_the_one_fine_tuning_ran_in(sample_bundle_root: Path) -> None:
    # The sample build pins fp32 (RankerTrainConfig.bf16=False), also on a CPU with native bf16.
    assert Bundle.open(sample_bundle_root).manifest["cross_encoder"]["precision"] == "fp32"


def test_the_fastest_copy_that_keeps_the_teachers_ndcg_serves(sample_bundle_root: Path) -> None:
    section = Bundle.open(sample_bundle_root).manifest["cross_encoder"]
    assert section["int8"]["calibration_pairs"] > 0 and section["student"]["layers"] >= 1
    parity = section["parity"]
    assert parity and set(parity) <= {"history", "query"}
    for rows in parity.values():
        assert set(rows) == {"fp32", "int8", "student", "student_int8"}
        assert all(0 <= r["ndcg@10"] <= 1 and r["pairs_per_s"] > 0 for r in rows.values())

    def keeps(name: str) -> bool:
        for rows in parity.values():
            ndcg = {n: r["ndcg@10"] for n, r in rows.items()}
            model = {"int8": "fp32", "student_int8": "student"}.get(name)
            if model and ndcg[name] < (1 - INT8_TOLERANCE) * ndcg[model]:
                return False
            if name.startswith("student") and ndcg[name] < STUDENT_KEEPS * ndcg["fp32"]:
                return False
        return True

    follows = section["student"]["held_out"]["spearman"] >= STUDENT_MIN_SPEARMAN
    allowed = [
        name
        for name in ("fp32", "int8", "student", "student_int8")
        if keeps(name) and (follows or not name.startswith("student"))
    ]
    speed = {n: min(rows[n]["pairs_per_s"] for rows in parity.values()) for n in allowed}
    assert section["serving_copy"] == max(allowed, key=lambda n: speed[n])


def test_without_queries_searches_never_use_the_cross_encoder(tmp_path: Path) -> None:
    """None logged and no --queries: the cross-encoder was never fine-tuned on a search, so
    searches keep the first pass (retrieval's order) and the manifest says why."""
    catalog, interactions = sample_paths()
    frame, _ = load_interactions(interactions)
    unlogged = tmp_path / "interactions.csv"
    frame.drop(columns=["query"]).to_csv(unlogged, index=False)
    bundle = build_bundle(
        BuildOptions(
            catalog=catalog,
            interactions=unlogged,
            out=tmp_path / "bundle",
            ranker=RankerTrainConfig(steps=2, batch_size=4, max_length=32, validation_users=8),
            student=None,
            fusion_lists=20,
            device="cpu",
        )
    )
    query = bundle.manifest["fusion"]["query"]
    assert query["second"] is None and not query["cross_encoder_pays"]
    assert query["fitted_on"]["cross_encoder"].startswith("skipped")
    # Recommendations still have their cross-encoder to weigh.
    assert bundle.manifest["fusion"]["history"]["second"] is not None
    # Its int8 copy is made only where fusion found it pays for some kind of request.
    pays = bundle.manifest["fusion"]["history"]["cross_encoder_pays"]
    section = bundle.manifest["cross_encoder"]
    assert ("int8" in section) == (bundle.path / DIRS["int8"]).is_dir() == pays
    assert (section.get("copies") == COPIES_SKIPPED) == (not pays)
    assert section["serving_copy"] == "fp32" or pays


def test_a_build_from_the_change_log_folds_its_changes_and_records_where_it_read_to(
    tmp_path: Path, change_log_url: str
) -> None:
    """`recsys build --change-log`: items upserted online join the catalog, deleted ones leave
    it, and the manifest records the log's id and position (the URL without its password)."""
    import numpy as np

    from recsys.app.cli import main
    from recsys.core import bundle as bundle_files
    from recsys.core.domain import Item
    from retrieval_service.catalog import load_catalog_items
    from retrieval_service.changelog import ChangeLog
    from retrieval_service.changes import deletes, upserts

    catalog, interactions = tiny_log(tmp_path)
    log = ChangeLog(change_log_url)
    new = Item("new-1", "An item added online", category="Online")
    log.append(upserts([new], np.ones((1, 384), np.float32), "any encoder"))
    position = log.append(deletes(["i0"]))
    with_password = change_log_url.replace("recsys@", "recsys:s3cret@")  # trust auth ignores it
    out = tmp_path / "bundle"
    argv = ["build", "--catalog", str(catalog), "--interactions", str(interactions)]
    assert main([*argv, "--out", str(out), "--no-ranker", "--change-log", with_password]) == 0
    bundle = Bundle.open(out)
    items = {item.item_id: item for item in load_catalog_items(bundle.file(bundle_files.CATALOG))}
    assert items["new-1"] == new and "i0" not in items and len(items) == 6
    assert bundle.manifest["change_log"] == {
        "log_id": log.log_id,
        "position": position,
        "name": log.name,
    }
    assert "s3cret" not in json.dumps(bundle.manifest)


# -- CF (ALS) validation search -------------------------------------------------------------------

GROUPS, GROUP_USERS, GROUP_ITEMS, USER_ITEMS = 4, 15, 20, 12


def taste_log() -> pd.DataFrame:
    """Four taste groups of 15 users; each user rates 12 of their group's 20 items over time,
    so a user's latest items are predictable from their earlier ones (a rank-4 structure)."""
    rng = np.random.default_rng(0)
    rows = []
    for g in range(GROUPS):
        for u in range(GROUP_USERS):
            items = rng.choice(GROUP_ITEMS, size=USER_ITEMS, replace=False)
            for t, i in enumerate(items):
                rows.append(
                    {
                        "user_id": f"g{g}u{u}",
                        "item_id": f"g{g}i{i}",
                        "timestamp": t,
                        "weight": float(rng.choice([1.0, 3.0, 5.0])),
                        "query": "",
                    }
                )
    return pd.DataFrame(rows)


def held_out_taste_log() -> tuple[pd.DataFrame, pd.DataFrame]:
    return hold_out_recent(taste_log(), 3)


SMALL_GRID = {"weighting": WEIGHTINGS, "factors": (1, 8), "alpha": (2.0, 10.0)}
# Rank 1 cannot tell four groups apart: the search must move away from it.
POOR_START = ALSParams(factors=1, iterations=5, regularization=0.05, alpha=2.0)


def test_the_cf_search_records_every_setting_and_picks_one_no_worse_than_its_start() -> None:
    train, validation = held_out_taste_log()
    found = search_cf(train, validation, POOR_START, seed=0, grid=SMALL_GRID)
    record = found.record
    tried = record["tried"]
    settings = [ALSParams.of(row) for row in tried]
    assert len(set(settings)) == len(settings) == record["fits"] > 1
    assert settings[0] == POOR_START and record["start"] == tried[0]
    assert record["validation_users"] == GROUPS * GROUP_USERS
    # Coordinate descent: every value of every dimension was tried at least once.
    for name, values in SMALL_GRID.items():
        assert {row[name] for row in tried} >= set(values), name
    # The chosen setting is the best tried (the first such), never worse than the start ...
    best = max(row["ndcg@10"] for row in tried)
    assert record["chosen"]["ndcg@10"] == best >= record["start"]["ndcg@10"]
    assert record["chosen"] == next(row for row in tried if row["ndcg@10"] == best)
    assert found.params == ALSParams.of(record["chosen"])
    # ... and here strictly better: more than one factor separates the groups.
    assert found.params.factors == 8 and best > record["start"]["ndcg@10"] + 0.05
    assert record["passes"] in (1, 2) and record["seconds"] >= 0
    # Seeded: the same data gives the same search.
    again = search_cf(train, validation, POOR_START, seed=0, grid=SMALL_GRID)
    assert again.params == found.params
    assert {**again.record, "seconds": 0} == {**record, "seconds": 0}


def test_the_cf_search_scores_what_the_evaluation_scores_for_cf() -> None:
    """Each tried setting's figure is the evaluation's `cf` on validation users: ALS fitted on
    train, each user folded in from their train history, everything seen excluded."""
    from recsys.app.evaluation.metrics import accuracy
    from recsys.core.settings import default
    from recsys.offline.splits import histories, relevant_items

    train, validation = held_out_taste_log()
    start = ALSParams(factors=8, iterations=5)
    found = search_cf(train, validation, start, grid={"weighting": WEIGHTINGS})
    cf = CFModel.train(train, seed=0, **start.kwargs())
    seen = histories(train)
    answers = {}
    for user, history in seen.items():
        vector = cf.fold_in(history[: default("max_history_items")])
        assert vector is not None
        answers[user] = [i for i, _ in cf.recommend(vector, 10, exclude=set(history))]
    relevant = relevant_items(validation, -np.inf)
    expected = accuracy(relevant, answers)["ndcg@10"]
    assert found.record["start"]["ndcg@10"] == pytest.approx(expected, abs=1e-4)


def test_the_cf_search_is_skipped_with_too_few_validation_users() -> None:
    train, validation = held_out_taste_log()
    found = search_cf(train, validation, POOR_START, grid=SMALL_GRID, min_users=61)
    assert found.params == POOR_START
    assert found.record == {
        "skipped": "skipped: 60 validation users with held-out items and train history "
        "(need 61); trained with the values given"
    }
    # Only relevant held-out items count: none weighs 6.
    found = search_cf(train, validation, POOR_START, relevant_min_weight=6.0, grid=SMALL_GRID)
    assert "skipped: 0 validation users" in found.record["skipped"]


def test_the_build_trains_cf_with_the_values_its_search_chose(sample_bundle_root: Path) -> None:
    manifest = Bundle.open(sample_bundle_root).manifest
    cf, settings = manifest["cf"], manifest["settings"]
    search = cf["search"]
    assert settings["cf_search"] is True
    assert search["validation_users"] == manifest["validation"]["users"] >= MIN_USERS
    # The search started from the options' values; the CF served was trained with its choice.
    start = ALSParams(
        settings["cf_factors"],
        settings["cf_iterations"],
        settings["cf_regularization"],
        settings["cf_alpha"],
        settings["cf_weighting"],
    )
    assert start == ALSParams() and ALSParams.of(search["start"]) == start
    assert ALSParams.of(cf) == ALSParams.of(search["chosen"])
    assert search["chosen"]["ndcg@10"] >= search["start"]["ndcg@10"]
    assert len(search["tried"]) == search["fits"] <= 2 * sum(len(v) for v in GRID.values())
    assert search["grid"] == {name: list(values) for name, values in GRID.items()}
    # The search records its seconds to 0.1 s; the build's timing around it, at that precision,
    # is never less (rounding keeps order).
    timing = round(manifest["timings"]["cf_search_seconds"], 1)
    assert search["fits"] > 1 and timing >= search["seconds"]


def test_without_cf_search_the_build_trains_with_the_values_given(tmp_path: Path) -> None:
    """`recsys build` without `--cf-search`: the built-in ALS values, and the manifest says so."""
    from recsys.app.cli import main
    from recsys.app.manifest_view import format_manifest

    catalog, interactions = tiny_log(tmp_path)
    out = tmp_path / "bundle"
    argv = ["build", "--catalog", str(catalog), "--interactions", str(interactions)]
    assert main([*argv, "--out", str(out), "--no-ranker"]) == 0
    manifest = Bundle.open(out).manifest
    assert manifest["settings"]["cf_search"] is False
    assert ALSParams.of(manifest["cf"]) == ALSParams()
    assert manifest["cf"]["weighting"] == "weight"
    assert manifest["cf"]["search"] == {"skipped": "off: trained with the values given"}
    assert "weighting=weight; validation search off" in format_manifest(manifest, out)
