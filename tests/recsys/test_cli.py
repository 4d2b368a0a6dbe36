"""The `recsys` command: bad input gets one line and exit 2 and leaves CURRENT alone; inspection works."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from recsys.cli import main
from recsys.sample import sample_paths

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
    for args, expected in [
        (["--encoder", str(tmp_path)], str(tmp_path)),
        (["--index-factory", "IVFbogus,Flat"], "IVFbogus"),
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
