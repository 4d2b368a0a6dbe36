"""requirements/lock.py: the lock `make` installs through agrees with pyproject.toml, and says so
when it does not."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock", ROOT / "requirements" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _load()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the files the check reads."""
    for rel in ("pyproject.toml", "requirements/lock.in", "requirements/lock.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_the_committed_lock_agrees_with_its_inputs() -> None:
    assert lock.check(ROOT) == []


def test_every_input_is_pinned_and_torch_is_the_cpu_version_make_installs() -> None:
    pins = lock.pins((ROOT / "requirements" / "lock.txt").read_text())
    assert pins["torch"] == "2.13.0"
    for name in ("transformers", "faiss-cpu", "mypy", "ruff", "grpcio-tools", "pip", "milvus-lite"):
        assert name in pins, name


def test_a_comment_in_pyproject_changes_nothing(tree: Path) -> None:
    _edit(tree / "pyproject.toml", "dependencies = [", "dependencies = [\n  # a note")
    assert lock.check(tree) == []


def test_a_raised_floor_names_the_requirement_and_the_pin(tree: Path) -> None:
    pinned = lock.pins((tree / "requirements/lock.txt").read_text())["transformers"]
    _edit(tree / "pyproject.toml", '"transformers>=4.45"', '"transformers>=99"')
    problems = lock.check(tree)
    assert problems == [
        "pyproject.toml [project.dependencies]: transformers>=99, but requirements/lock.txt "
        f"pins transformers=={pinned}: run `make lock`"
    ]


def test_a_new_dependency_is_not_in_the_lock(tree: Path) -> None:
    _edit(tree / "pyproject.toml", '"pytest>=8",', '"pytest>=8",\n  "left-pad-nowhere>=1",')
    assert lock.check(tree) == [
        "pyproject.toml [dev]: left-pad-nowhere>=1 is not in requirements/lock.txt: run `make lock`"
    ]


def test_inputs_that_the_pins_still_satisfy_need_a_new_lock_too(tree: Path) -> None:
    # Dropping a requirement leaves every remaining one pinned, but the lock was not made from it.
    _edit(tree / "pyproject.toml", '  "tqdm>=4.66",\n', "")
    (problem,) = lock.check(tree)
    assert "resolved from other inputs" in problem


def test_a_torch_default_elsewhere_must_be_the_locks(tree: Path) -> None:
    dockerfile = tree / "deploy/docker/Dockerfile"
    dockerfile.parent.mkdir(parents=True)
    dockerfile.write_text('ARG TORCH_SPEC="torch==2.9.1"\n')
    assert lock.check(tree) == [
        "deploy/docker/Dockerfile: its default torch==2.9.1, the lock's torch==2.13.0"
    ]


def test_missing_lock(tree: Path) -> None:
    (tree / "requirements/lock.txt").unlink()
    assert lock.check(tree) == ["requirements/lock.txt is missing: run `make lock`"]


def test_moved_lists_changed_added_and_removed_pins() -> None:
    old = {"a": "1", "b": "2", "c": "3"}
    new = {"a": "1", "b": "2.1", "d": "4"}
    assert lock.moved(old, new) == ["  b 2 -> 2.1", "  + d 4", "  - c 3"]
