"""`recsys retrain`: the next version reuses the live one's embeddings and cross-encoder, and
CURRENT switches only when the gate passes; a broken candidate is refused and kept aside.

The live version is the session's sample bundle; the retrain reads a log that grew since: the
sample interactions plus 30 more days of the same users' sessions. The gate's held-out
interactions are the later ones, which the live version never saw.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ranking_service.cf import ALSParams
from recsys.app.cli import main
from recsys.app.ingest import load_interactions
from recsys.app.retrain import EXIT_REFUSED, judge, retrain_options
from recsys.app.sample import sample_paths
from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle, publish, write_manifest
from recsys.core.errors import InvalidInput
from tests.recsys.sample_helpers import write_grown_log

# A retrain is a (shorter) build plus two versions ranking the held-out users: minutes on a
# busy 2-core machine, on top of the session's sample bundle when this module builds it.
pytestmark = pytest.mark.timeout(1800)

CATALOG, INTERACTIONS = sample_paths()
SAMPLE_ITEMS = 345
RETRAIN_STEPS = 4
# The sample is small: two versions' NDCG@10 differ by chance far more than on real data.
LENIENT = "0.5"

RetrainRun = tuple[Path, str, subprocess.CompletedProcess[str]]


def cli(*args: str | Path | int) -> subprocess.CompletedProcess[str]:
    """`recsys ARGS` as a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "recsys", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )


def current(root: Path) -> str:
    return (root / bundle_files.CURRENT).read_text().strip()


@pytest.fixture(scope="module")
def grown_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_grown_log(tmp_path_factory.mktemp("log") / "interactions.csv", days=30)


@pytest.fixture(scope="module")
def retrained(
    sample_bundle_root: Path, grown_log: Path, tmp_path_factory: pytest.TempPathFactory
) -> RetrainRun:
    """(root, the live version, the run) after `recsys retrain` on the grown log."""
    root = tmp_path_factory.mktemp("retrained") / "root"
    shutil.copytree(sample_bundle_root, root)
    live = current(root)
    run = cli(
        "retrain",
        "--bundle",
        root,
        "--interactions",
        grown_log,
        "--ranker-steps",
        RETRAIN_STEPS,
        "--max-drop",
        LENIENT,
        "--device",
        "cpu",
    )
    return root, live, run


def set_aside(retrained: RetrainRun, tmp_path: Path) -> tuple[Path, str, str]:
    """(root, live, candidate): a copy of the retrained root with CURRENT back on the live
    version, as it was before the gate ran."""
    root, live, run = retrained
    assert run.returncode == 0, run.stderr[-3000:]
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    candidate = current(copy)
    publish(copy, live)
    return copy, live, candidate


def test_retrain_reuses_the_live_version_and_switches_when_the_gate_passes(
    retrained: RetrainRun, grown_log: Path
) -> None:
    root, live, run = retrained
    assert run.returncode == 0, run.stderr[-3000:]
    candidate = current(root)
    assert candidate != live
    # Same catalog, same encoder files: no item is encoded again.
    assert f"reused {SAMPLE_ITEMS} of {SAMPLE_ITEMS} item embeddings" in run.stderr
    assert f"reused {SAMPLE_ITEMS} of {SAMPLE_ITEMS} item embeddings from {live}" in run.stdout
    figures = re.search(
        rf"gate: recommend NDCG@10 on (\d+) held-out users: live {live} ([\d.]+), "
        rf"candidate {candidate} ([\d.]+), difference ([+-][\d.]+)",
        run.stdout,
    )
    assert figures, run.stdout
    users, before, after, diff = figures.groups()
    assert int(users) >= 10
    assert float(after) >= float(before) * (1 - float(LENIENT))
    assert float(diff) == pytest.approx(float(after) - float(before), abs=2e-4)
    assert "tolerance: at most 50.0% below live -> pass" in run.stdout
    assert f"switched CURRENT {live} → {candidate}" in run.stdout

    manifest = Bundle.open(root).manifest
    assert manifest["warm_start"]["from"] == live
    assert manifest["embeddings"] == {"items": SAMPLE_ITEMS, "reused": SAMPLE_ITEMS, "encoded": 0}
    ce = manifest["cross_encoder"]
    assert Path(ce["warm_start"]) == root / live / bundle_files.CROSS_ENCODER_DIR
    assert ce["max_steps"] == RETRAIN_STEPS
    # The live version's settings carry over; every interaction of the grown log is read.
    assert manifest["settings"]["ranker"]["batch_size"] == 8
    assert manifest["settings"]["fusion_lists"] == 40
    assert manifest["counts"]["interactions"] == len(pd.read_csv(grown_log))
    assert Bundle.open(root).verify() == []
    # CF trains with the ALS values the live version's search chose, searching no more.
    assert ALSParams.of(manifest["cf"]) == ALSParams.of(Bundle.open(root, live).manifest["cf"])
    assert manifest["cf"]["search"] == {"skipped": f"off: {live}'s values, reused"}
    assert manifest["settings"]["cf_search"] is False


def test_a_corrupted_candidate_is_refused_kept_aside_and_current_unchanged(
    retrained: RetrainRun, grown_log: Path, tmp_path: Path
) -> None:
    root, live, candidate = set_aside(retrained, tmp_path)
    weights = root / candidate / bundle_files.CROSS_ENCODER_DIR / "model.safetensors"
    weights.write_bytes(b"\0" * 64 + weights.read_bytes()[64:])
    run = cli(
        "retrain",
        "--bundle",
        root,
        "--interactions",
        grown_log,
        "--candidate",
        candidate,
        "--device",
        "cpu",
    )
    assert run.returncode == EXIT_REFUSED, run.stderr[-3000:]
    assert (
        "refused: checksum mismatch or missing file: cross_encoder/model.safetensors" in run.stdout
    )
    assert f"CURRENT stays {live}" in run.stdout
    assert current(root) == live
    record = json.loads((root / candidate / bundle_files.REJECTED).read_text())
    assert record["live"] == live and "cross_encoder/model.safetensors" in record["reason"]
    with pytest.raises(InvalidInput, match="refused by the retrain gate"):
        publish(root, candidate)
    listing = cli("bundle", "list", root)
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if candidate in x)
    assert f"from {live}" in line and "REJECTED: refused: checksum mismatch" in line
    assert next(x for x in listing.stdout.splitlines() if live in x).startswith("*")


def test_a_candidate_that_fails_to_load_is_refused(
    retrained: RetrainRun, grown_log: Path, tmp_path: Path
) -> None:
    root, live, candidate = set_aside(retrained, tmp_path)
    # Broken in a way checksums cannot see: the manifest was written after the damage.
    version = root / candidate
    (version / bundle_files.FUSION).write_text("{not json")
    manifest = json.loads((version / bundle_files.MANIFEST).read_text())
    write_manifest(version, {k: v for k, v in manifest.items() if k != "files"})
    interactions, _ = load_interactions(grown_log)
    done = judge(Bundle.open(root), Bundle.open(root, candidate), interactions, device="cpu")
    assert not done.switched and current(root) == live
    assert done.gate.reason.startswith("refused: the candidate fails to load or rank")
    assert (version / bundle_files.REJECTED).is_file()


def test_without_new_held_out_interactions_the_gate_refuses(
    retrained: RetrainRun, tmp_path: Path
) -> None:
    root, live, candidate = set_aside(retrained, tmp_path)
    # The live version was built on every one of these.
    run = cli("retrain", "--bundle", root, "--interactions", INTERACTIONS, "--candidate", candidate)
    assert run.returncode == EXIT_REFUSED, run.stderr[-3000:]
    assert f"refused: only 0 users with held-out interactions after {live}'s last one" in run.stdout
    assert current(root) == live


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("recsys: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_user_mistakes_exit_2_with_one_line_and_keep_current(
    sample_bundle_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    shutil.copytree(sample_bundle_root, root)
    live = current(root)
    versions = sorted(p.name for p in root.iterdir())
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item\nU1,P0001\n")
    (tmp_path / "empty").mkdir()
    cases: list[tuple[str, str | Path, str]] = [
        ("--bundle", tmp_path / "empty", "no CURRENT file"),
        ("--interactions", tmp_path / "absent.csv", "absent.csv"),
        ("--interactions", bad, str(bad)),
        ("--catalog", tmp_path / "absent.csv", "absent.csv"),
        ("--max-drop", "1.5", "--max-drop 1.5"),
        ("--ranker-steps", "0", "--ranker-steps 0"),
        ("--gate-users", "0", "--gate-users 0"),
        ("--candidate", "nope", "'nope' is incomplete"),
        ("--candidate", live, "is the live version"),
    ]
    for flag, value, expected in cases:
        given: dict[str, str | Path] = {"--bundle": root, "--interactions": INTERACTIONS}
        given[flag] = value
        assert main(["retrain", *(str(x) for pair in given.items() for x in pair)]) == 2, flag
        line = error_line(capsys.readouterr().err)
        assert expected in line, (flag, value, line)
    assert current(root) == live
    assert sorted(p.name for p in root.iterdir()) == versions


def test_retrain_options_take_the_live_versions_chosen_cf_values(
    sample_bundle_root: Path, tmp_path: Path
) -> None:
    """The values its CF was trained with (its manifest's `cf`), not the build options' starting
    point, and no search; a live version from before `weighting` was recorded trained with
    weights."""
    root = tmp_path / "root"
    shutil.copytree(sample_bundle_root, root)
    live = current(root)
    manifest = json.loads((root / live / bundle_files.MANIFEST).read_text())
    chosen = ALSParams(
        factors=32, iterations=30, regularization=1.0, alpha=40.0, weighting="binary"
    )
    manifest["cf"] |= chosen.kwargs()
    write_manifest(root / live, {k: v for k, v in manifest.items() if k != "files"})
    options = retrain_options(Bundle.open(root), root, INTERACTIONS)
    assert options.cf_search is False
    assert (
        options.cf_factors,
        options.cf_iterations,
        options.cf_regularization,
        options.cf_alpha,
        options.cf_weighting,
    ) == (32, 30, 1.0, 40.0, "binary")
    del manifest["cf"]["weighting"]
    write_manifest(root / live, {k: v for k, v in manifest.items() if k != "files"})
    assert retrain_options(Bundle.open(root), root, INTERACTIONS).cf_weighting == "weight"
