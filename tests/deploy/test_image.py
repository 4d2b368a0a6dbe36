"""The CPU image is real: deploy/docker/build-and-check.sh builds it with podman on a
debian:bookworm-slim made from Debian's packages, serves the sample bundle from it as deploy/k8s
runs it, and checks gRPC health from outside.

Minutes cold (debootstrap, then pip inside the build); the base and the image's layers are
reused on the next run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recsys.rpc.launcher import SERVICES
from tests.deploy.conftest import DEPLOY

SCRIPT = DEPLOY / "docker" / "build-and-check.sh"
MISSING = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
TIMEOUT_S = 1500


def checks(stdout: str) -> dict[str, str]:
    """The script's `check NAME=VALUE` lines."""
    lines = [line.removeprefix("check ") for line in stdout.splitlines()]
    return dict(line.split("=", 1) for line in lines if "=" in line)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.skipif(
    bool(MISSING),
    reason=f"needs {' and '.join(MISSING)} (.ci/run installs Debian's podman and debootstrap)",
)
def test_cpu_image_serves_as_non_root_on_a_read_only_root(sample_bundle_root: Path) -> None:
    run = subprocess.run(
        ["bash", str(SCRIPT), str(sample_bundle_root)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    found = checks(run.stdout)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr[-6000:]}"
    assert {f"health {name}" for name in SERVICES} <= found.keys(), run.stdout
    for name in SERVICES:
        assert found[f"health {name}"] == "SERVING", name
    assert found["uid"] == found["process_uid"] == "10001"
    assert found["rootfs"] == "read-only"
    assert found["tmp"] == "writable"
    assert found["exit_code"] == "0", "recsys drains and exits 0 on SIGTERM"
