"""The development and CI lock: requirements/lock.txt pins every package `make` installs.

    python requirements/lock.py refresh --uv PATH [--keep]   # `make lock`: resolve, say what moved
    python requirements/lock.py check                        # `make lint`: lock and inputs agree

The inputs are pyproject.toml's dependencies, the extras `make` installs (LOCKED_EXTRAS) and
requirements/lock.in (the torch version, pip). The lock records a digest of them, so any edit
to the requirements without `make lock` fails the check. The project's published requirements
stay floors: the lock is for this project's machines and CI, not for users of the package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
LOCK_IN = ROOT / "requirements" / "lock.in"
# `make` installs cpu, dev and milvus-lite; bench (benchmarks/ce_backends.py) is pinned too, so
# `pip install -c requirements/lock.txt -e ".[bench]"` agrees with the rest.
LOCKED_EXTRAS = ("cpu", "dev", "milvus-lite", "bench")
# The machines `make` and CI run on, and the CPU image's base (Debian bookworm, glibc 2.36).
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
DIGEST_LINE = "# inputs-sha256: "
# Defaults elsewhere that name the torch version `make` installs; they must say the lock's.
TORCH_DEFAULTS = {
    "deploy/docker/Dockerfile": r'ARG TORCH_SPEC="torch==([^"]+)"',
    "deploy/docker/Dockerfile.cuda": r'ARG TORCH_SPEC="torch==([^"]+)"',
    "deploy/docker/build-and-check.sh": r"TORCH=\$\{TORCH:-torch==([^}]+)\}",
}


def inputs(root: Path = ROOT) -> list[tuple[str, str]]:
    """(where it is declared, requirement) for everything the lock is resolved from."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    found = [("pyproject.toml [project.dependencies]", r) for r in project["dependencies"]]
    for extra in LOCKED_EXTRAS:
        found += [(f"pyproject.toml [{extra}]", r) for r in project["optional-dependencies"][extra]]
    lock_in = root / LOCK_IN.relative_to(ROOT)
    for line in lock_in.read_text().splitlines():
        if line.split("#", 1)[0].strip():
            found.append(("requirements/lock.in", line.strip()))
    return found


def digest(root: Path = ROOT) -> str:
    payload = {
        "requires": sorted(r for _, r in inputs(root)),
        "python": PYTHON_VERSION,
        "platform": PLATFORM,
        "extras": LOCKED_EXTRAS,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def pins(text: str) -> dict[str, str]:
    """name (normalised) -> version, from a requirements file of `name==version` lines."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            found[_normalise(match[1])] = match[2]
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check(root: Path = ROOT) -> list[str]:
    """What disagrees between the inputs and the lock, one line each; empty when all agree."""
    from packaging.requirements import Requirement

    lock_path = root / LOCK.relative_to(ROOT)
    if not lock_path.exists():
        return [f"{lock_path.relative_to(root)} is missing: run `make lock`"]
    text = lock_path.read_text()
    locked = pins(text)
    problems = []
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"]
    for where, line in inputs(root):
        req = Requirement(line)
        name = _normalise(req.name)
        if name == project:
            continue
        if name not in locked:
            problems.append(f"{where}: {line} is not in requirements/lock.txt: run `make lock`")
        elif not req.specifier.contains(locked[name], prereleases=True):
            problems.append(
                f"{where}: {line}, but requirements/lock.txt pins {name}=={locked[name]}: "
                "run `make lock`"
            )
    recorded = next(
        (ln[len(DIGEST_LINE) :] for ln in text.splitlines() if ln.startswith(DIGEST_LINE)), None
    )
    if not problems and recorded != digest(root):
        problems.append(
            "requirements/lock.txt was resolved from other inputs than pyproject.toml and "
            "requirements/lock.in hold now: run `make lock`"
        )
    torch = locked.get("torch")
    for rel, pattern in TORCH_DEFAULTS.items():
        path = root / rel
        match = re.search(pattern, path.read_text()) if path.exists() else None
        if match is not None and match[1] != torch:
            problems.append(f"{rel}: its default torch=={match[1]}, the lock's torch=={torch}")
    return problems


def moved(old: dict[str, str], new: dict[str, str]) -> list[str]:
    lines = [
        f"  {n} {old[n]} -> {new[n]}" for n in sorted(old.keys() & new.keys()) if old[n] != new[n]
    ]
    lines += [f"  + {n} {new[n]}" for n in sorted(new.keys() - old.keys())]
    lines += [f"  - {n} {old[n]}" for n in sorted(old.keys() - new.keys())]
    return lines


def refresh(uv: str, keep: bool) -> int:
    """Resolve the inputs anew with uv (newest releases, or the current pins where `keep`)."""
    old = pins(LOCK.read_text()) if LOCK.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lock.txt"
        if keep and LOCK.exists():
            out.write_text(LOCK.read_text())
        cmd = [uv, "pip", "compile", "--quiet", "pyproject.toml", str(LOCK_IN.relative_to(ROOT))]
        cmd += [arg for extra in LOCKED_EXTRAS for arg in ("--extra", extra)]
        cmd += ["--python-version", PYTHON_VERSION, "--python-platform", PLATFORM]
        cmd += ["--custom-compile-command", "make lock", "--output-file", str(out)]
        cmd += [] if keep else ["--upgrade"]
        result = subprocess.run(cmd, cwd=ROOT, check=False)
        if result.returncode != 0:
            print(
                "make lock: uv could not resolve the inputs (above); the lock is unchanged",
                file=sys.stderr,
            )
            return 1
        body = out.read_text()
    header = (
        "# The development and CI lock: `make` installs through it (pip -c). Refresh with\n"
        "# `make lock`; `make lint` fails when it and pyproject.toml or requirements/lock.in disagree.\n"
        f"{DIGEST_LINE}{digest()}\n"
    )
    LOCK.write_text(header + body)
    changes = moved(old, pins(body))
    print("requirements/lock.txt: " + (f"{len(changes)} changed" if changes else "nothing moved"))
    print("\n".join(changes))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("refresh", help="resolve the inputs anew into requirements/lock.txt")
    ref.add_argument("--uv", required=True, help="the uv executable")
    ref.add_argument(
        "--keep", action="store_true", help="keep current pins where the inputs allow them"
    )
    sub.add_parser("check", help="fail when the lock and its inputs disagree")
    args = parser.parse_args(argv)
    if args.command == "refresh":
        return refresh(args.uv, args.keep)
    problems = check()
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
