"""Regenerates the committed protobuf/gRPC stubs in recsys/v1 from protos/recsys/v1."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"


def proto_files() -> list[Path]:
    """The contract's .proto files, in a stable order."""
    return sorted((PROTO_ROOT / "recsys" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto under out_dir/recsys/v1."""
    from grpc_tools import protoc  # dev-only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")
    return sorted((out_dir / "recsys" / "v1").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsys.app.codegen",
        description="Regenerate recsys/v1/*_pb2*.py(i) from protos/recsys/v1/*.proto.",
    )
    parser.parse_args(argv)
    written = generate(REPO_ROOT)
    print(f"wrote {len(written)} files under {REPO_ROOT / 'recsys' / 'v1'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
