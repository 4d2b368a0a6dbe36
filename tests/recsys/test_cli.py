"""The `recsys` command: bad input gets one line and exit 2 and leaves CURRENT alone, an
unreachable dependency exit 4, damaged stored data exit 5; inspection works."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from recsys.app import logs
from recsys.app.cli import build_parser, main
from recsys.app.cli.common import resolve
from recsys.app.retrain import EXIT_REFUSED
from recsys.app.sample import sample_paths
from recsys.core import bundle as bundle_files
from recsys.core.settings import Settings, default
from recsys.rpc.launcher import free_port

CATALOG, INTERACTIONS = sample_paths()


def error_line(err: str) -> str:
    """The one `recsys: error:` line (log lines may share stderr)."""
    lines = [line for line in err.splitlines() if line.startswith("recsys: error:")]
    assert len(lines) == 1, err
    return lines[0]


def build(tmp_path: Path, out: Path, *extra: str, catalog: Path = CATALOG) -> int:
    return main(
        [
            "build",
            "--catalog",
            str(catalog),
            "--interactions",
            str(INTERACTIONS),
            "--out",
            str(out),
            "--no-ranker",
            *extra,
        ]
    )


@pytest.fixture()
def root_with_bundle(sample_bundle_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(sample_bundle_root, root)
    return root


def bad_catalogs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    text = CATALOG.read_text().splitlines()
    cases = {
        "missing_column": ("id,title\nA,x\n", "item_id"),
        "duplicate": ("item_id,title\nA,x\nA,y\n", "duplicate item_id 'A'"),
        "empty": ("", "empty"),
    }
    out = {}
    for name, (content, expected) in cases.items():
        path = tmp_path / f"{name}.csv"
        path.write_text(content)
        out[name] = (path, expected)
    unknown = tmp_path / "catalog.xlsx"
    unknown.write_text("\n".join(text))
    out["unknown_format"] = (unknown, "unknown format")
    return out


def test_bad_catalogs_exit_2_with_one_line_and_keep_current(
    root_with_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    current = (root_with_bundle / "CURRENT").read_text()
    versions = sorted(p.name for p in root_with_bundle.iterdir())
    for name, (path, expected) in bad_catalogs(tmp_path).items():
        assert build(tmp_path, root_with_bundle, catalog=path) == 2, name
        err = error_line(capsys.readouterr().err)
        assert str(path) in err and expected in err, (name, err)
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"query": "tents", "item_ids": ["P0001"]}\n{"query": "no items"}\n')
    for args, expected in [
        (["--encoder", str(tmp_path)], str(tmp_path)),
        (["--index-factory", "IVFbogus,Flat"], "IVFbogus"),
        (["--queries", str(queries)], f"{queries} line 2"),
        (["--queries", str(tmp_path / "absent.jsonl")], "absent.jsonl"),
        (["--rerank-budget-ms", "0"], "--rerank-budget-ms 0"),
        (["--ranker-seconds", "-5"], "--ranker-seconds -5.0"),
    ]:
        assert build(tmp_path, root_with_bundle, *args) == 2
        assert expected in error_line(capsys.readouterr().err)
    assert (root_with_bundle / "CURRENT").read_text() == current
    assert sorted(p.name for p in root_with_bundle.iterdir()) == versions


def test_bundle_info_and_search(
    sample_bundle_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bundle", "info", str(sample_bundle_root), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "items         345" in out and "verified" in out
    assert re.search(r"text sequence \d+ epochs over [\d,]+ steps", out)
    queries = tmp_path / "q.txt"
    queries.write_text("wireless headphones\ntrail running shoes\n")
    assert (
        main(
            [
                "search",
                "--bundle",
                str(sample_bundle_root),
                "--queries",
                str(queries),
                "--k",
                "3",
                "--json",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in rows] == ["wireless headphones", "trail running shoes"]
    assert all(len(r["hits"]) == 3 and {"item_id", "score"} <= set(r["hits"][0]) for r in rows)


def test_search_bad_arguments(sample_bundle_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--bundle", str(sample_bundle_root), "x", "--k", "0"]) == 2
    assert "--k" in capsys.readouterr().err
    assert main(["bundle", "info", "/nonexistent/root"]) == 2
    assert "/nonexistent/root" in capsys.readouterr().err


# -- exit codes -------------------------------------------------------------------------------------


def recsys(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`recsys ARGS` as its own process, as a script or a Job runs it."""
    return subprocess.run(
        [sys.executable, "-m", "recsys", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def only_line(err: str) -> str:
    """The failure's one line: nothing else on stderr, no traceback."""
    assert len(err.splitlines()) == 1 and err.startswith("recsys: error: "), err
    return err


def test_help_says_what_each_exit_code_means(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for meaning in (
        "0 done",
        "2 bad input",
        f"{EXIT_REFUSED} `recsys retrain`'s gate refused the candidate",
        "4 a dependency is unreachable",
        "5 stored data is corrupt",
    ):
        assert meaning in text


def test_an_unreachable_dependency_exits_4_with_one_line_naming_it(
    sample_bundle_root: Path,
) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://recsys@127.0.0.1:{port}/catalog"
    run = recsys("catalog", "trim-log", "--bundle", sample_bundle_root, "--change-log", url)
    assert run.returncode == 4
    assert only_line(run.stderr).startswith(f"recsys: error: change log {url} table ")

    address = f"127.0.0.1:{free_port()}"
    run = recsys("catalog", "upsert", CATALOG, "--retrieval", address)
    assert run.returncode == 4
    assert only_line(run.stderr).startswith(
        f"recsys: error: retrieval service unavailable at {address}: "
    )
    assert "(0 of 345 items acknowledged before this batch)" in run.stderr


def test_a_damaged_bundle_exits_5_with_one_line_and_keeps_current(
    sample_bundle_root: Path, tmp_path: Path
) -> None:
    # Every file linked to the sample bundle's but one, changed after its checksum was taken.
    root = tmp_path / "root"
    shutil.copytree(sample_bundle_root, root, copy_function=os.symlink)
    version = (root / bundle_files.CURRENT).read_text().strip()
    damaged = root / version / bundle_files.FUSION
    text = damaged.read_text()
    damaged.unlink()
    damaged.write_text(text + " ")
    versions = sorted(p.name for p in root.iterdir())

    run = recsys("bundle", "info", root, "--verify")
    assert run.returncode == 5
    assert "items         345" in run.stdout  # the summary still prints
    assert only_line(run.stderr) == (
        f"recsys: error: 1 files differ from the manifest: {bundle_files.FUSION}\n"
    )
    run = recsys("retrain", "--bundle", root, "--interactions", INTERACTIONS)
    assert run.returncode == 5
    error = error_line(run.stderr)
    assert f"the live version's files differ from its manifest ({bundle_files.FUSION})" in error
    assert "Traceback" not in run.stderr
    assert (root / bundle_files.CURRENT).read_text().strip() == version
    assert sorted(p.name for p in root.iterdir()) == versions


# -- logging, progress and defaults ----------------------------------------------------------------


@pytest.fixture()
def restored_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """main() configures the process's logging and the libraries' variables: undo it afterwards."""
    for variable in (*logs.VERBOSITY_VARIABLES, *logs.PROGRESS_VARIABLES, "RECSYS_LOG_LEVEL"):
        if variable in os.environ:
            monkeypatch.setenv(variable, os.environ[variable])  # restored on teardown
        else:
            monkeypatch.delenv(variable, raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {name: logging.getLogger(name).level for name in logs.LIBRARY_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, library_level in libraries.items():
        logging.getLogger(name).setLevel(library_level)


def enabled(logger: str, level: int) -> bool:
    return logging.getLogger(logger).isEnabledFor(level)


@pytest.mark.usefixtures("restored_logging")
def test_log_level_flag_reaches_our_loggers_and_libraries_only_at_debug() -> None:
    assert main(["bundle", "info", "/nonexistent/root"]) == 2  # logging is set up before it fails
    assert logging.getLogger().level == logging.INFO
    assert enabled("recsys.app.build", logging.INFO)
    for library in ("faiss.loader", "transformers.modeling_utils", "sentence_transformers"):
        assert not enabled(library, logging.WARNING), library
        assert enabled(library, logging.ERROR), library
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"

    assert main(["bundle", "info", "/nonexistent/root", "--log-level", "debug"]) == 2
    assert logging.getLogger().level == logging.DEBUG
    assert enabled("faiss.loader", logging.DEBUG) and enabled("transformers", logging.DEBUG)
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "debug"

    assert main(["search", "--bundle", "/nonexistent/root", "x"]) == 2
    assert logging.getLogger().level == logging.WARNING  # search prints hits, not progress
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logs.ProgressAwareHandler)]
    assert len(handlers) == 1  # configuring again replaces our handler


@pytest.mark.usefixtures("restored_logging")
def test_a_library_that_resets_its_level_on_import_stays_quiet(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bundle", "info", "/nonexistent/root"]) == 2
    capsys.readouterr()
    # What bm25s does when first imported (after our setup, as in `recsys evaluate`): it sets
    # its own logger to DEBUG. Done here directly: the module may already be imported.
    logging.getLogger("bm25s").setLevel(logging.DEBUG)
    logging.getLogger("bm25s").debug("library internals")
    logging.getLogger("recsys.app.build").info("our progress")
    err = capsys.readouterr().err
    assert "library internals" not in err
    assert "our progress" in err


@pytest.mark.usefixtures("restored_logging")
def test_serve_log_level_comes_from_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import recsys.app.services

    served: list[Settings] = []
    monkeypatch.setattr(
        recsys.app.services, "run_service", lambda name, settings: served.append(settings)
    )
    monkeypatch.setenv("RECSYS_LOG_LEVEL", "DEBUG")
    assert main(["serve", "retrieval", "--bundle", str(tmp_path)]) == 0
    assert logging.getLogger().level == logging.DEBUG
    assert served[-1].log_level == "DEBUG"  # the one Settings main() built serves too
    assert main(["serve", "retrieval", "--bundle", str(tmp_path), "--log-level", "ERROR"]) == 0
    assert logging.getLogger().level == logging.ERROR
    monkeypatch.setenv("RECSYS_LOG_LEVEL", "loud")
    assert main(["serve", "retrieval", "--bundle", str(tmp_path)]) == 2
    assert "log level 'loud'" in error_line(capsys.readouterr().err)
    assert len(served) == 2


def test_libraries_imported_later_stay_quiet_and_bundle_info_loads_no_torch(
    tmp_path: Path,
) -> None:
    """transformers sets its own level and bars on import: the setup must reach them anyway."""
    script = (
        "import logging, sys\n"
        "from recsys.app.cli import main\n"
        "assert main(['bundle', 'info', sys.argv[1]]) == 2\n"
        "assert 'torch' not in sys.modules, 'bundle info loaded torch'\n"
        "import transformers\n"
        "from transformers.utils import logging as hf_logging\n"
        "assert logging.getLogger('transformers').getEffectiveLevel() == logging.ERROR\n"
        "assert not hf_logging.is_progress_bar_enabled()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in logs.PROGRESS_VARIABLES}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "none")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_search_k_default_and_bound_come_from_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(Settings.model_fields["max_k"], "default", 5)
    monkeypatch.setattr(Settings.model_fields["default_k"], "default", 3)
    args = build_parser().parse_args(["search", "--bundle", "/nonexistent/root", "x"])
    assert args.k == default("default_k") == 3
    assert main(["search", "--bundle", "/nonexistent/root", "x", "--k", "6"]) == 2
    assert "--k 6: must be within 1..5" in error_line(capsys.readouterr().err)


def test_ranker_steps_defaults_have_one_home(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import recsys.app.demo
    import recsys.app.evaluation.runner
    from ranking_service.train import RankerTrainConfig

    monkeypatch.setattr(recsys.app.evaluation.runner, "RANKER_STEPS", 7)
    monkeypatch.setattr(recsys.app.demo, "DEMO_RANKER_STEPS", 9)
    parser = build_parser()
    build = parser.parse_args(["build", "--catalog", "c", "--interactions", "i", "--out", "o"])
    assert resolve(build.ranker_steps) == RankerTrainConfig().steps
    evaluate = parser.parse_args(["evaluate", "--data", "d", "--bundle", "b", "--out", "o"])
    assert resolve(evaluate.ranker_steps) == 7
    assert resolve(parser.parse_args(["demo"]).ranker_steps) == 9
    assert resolve(parser.parse_args(["demo", "--ranker-steps", "3"]).ranker_steps) == 3
    for command, steps in [("build", RankerTrainConfig().steps), ("evaluate", 7), ("demo", 9)]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"(default {steps}" in " ".join(capsys.readouterr().out.split()), command


def test_fine_tuning_shows_one_bar_not_the_trainers_metric_dicts(tmp_path: Path) -> None:
    from ranking_service.train import RankerTrainConfig, StepProgress, _training_args

    assert _training_args(
        RankerTrainConfig(steps=4), "cpu", tmp_path, evaluate=True, bf16=False
    ).disable_tqdm
    progress = StepProgress()
    args: Any = None
    state: Any = SimpleNamespace(max_steps=4, global_step=0)
    control: Any = SimpleNamespace(should_evaluate=True)
    progress.on_train_begin(args, state, control)
    state.global_step = 2
    progress.on_step_end(args, state, control)
    assert progress.bar is not None and progress.bar.n == 2
    assert progress.bar.desc.startswith("fine-tuning (validating)")
    progress.on_log(args, state, control, logs={"loss": 0.5, "grad_norm": 1.0})
    progress.on_evaluate(args, state, control)
    progress.on_log(args, state, control, logs={"eval_validation_ndcg@10": 0.25})
    assert progress.bar.desc.rstrip(": ") == "fine-tuning"
    assert progress.postfix == {"loss": "0.5000", "val ndcg@10": "0.2500"}  # no grad_norm
    progress.on_train_end(args, state, control)
    assert progress.bar is None


def test_catalog_export_state_folds_the_online_changes_into_a_catalog(
    sample_bundle_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from recsys.app.ingest import catalog_items, load_catalog
    from recsys.core import bundle as bundle_files
    from recsys.core.bundle import Bundle
    from recsys.core.domain import Item
    from retrieval_service.catalog import load_catalog_items
    from retrieval_service.state import OnlineState

    items = load_catalog_items(Bundle.open(sample_bundle_root).file(bundle_files.CATALOG))
    renamed = Item(items[0].item_id, "Renamed online", items[0].description, items[0].category)
    new = Item("NEW-1", "Brand new lamp", "", "Home", {"brand": "Acme"})
    state = OnlineState(tmp_path / "state", "any-encoder", 100)
    state.load()
    state.append_upsert([new, renamed], np.zeros((2, 4), np.float32))
    state.append_delete([items[1].item_id])
    state.close()
    out = tmp_path / "catalog.csv"
    argv = ["catalog", "export-state", "--bundle", str(sample_bundle_root), "--out", str(out)]

    assert main([*argv, "--state-dir", str(tmp_path / "state")]) == 0
    assert "1 deletes" in capsys.readouterr().out
    exported = catalog_items(load_catalog(out))
    assert [i.item_id for i in exported] == [
        items[0].item_id,
        *(i.item_id for i in items[2:]),
        "NEW-1",
    ]
    assert exported[0].title == "Renamed online" and exported[-1] == new
    assert exported[1:-1] == items[2:]

    assert main([*argv, "--state-dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such directory" in error_line(capsys.readouterr().err)
