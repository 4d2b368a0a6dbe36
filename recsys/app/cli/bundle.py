"""`recsys bundle info|list`: inspect a bundle root's versions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from recsys.app.cli.common import add_log_level
from recsys.core.errors import DataLoss


def add_bundle(sub: Any) -> None:
    p = sub.add_parser("bundle", help="inspect a bundle")
    bsub = p.add_subparsers(dest="bundle_command", required=True, metavar="COMMAND")
    info = bsub.add_parser(
        "info",
        help="print the manifest's essentials",
        description="Print the essentials of ROOT's CURRENT version.",
    )
    info.add_argument("root", type=Path, metavar="ROOT")
    info.add_argument("--version", help="a version other than CURRENT")
    info.add_argument("--verify", action="store_true", help="also check every file's sha256")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    add_log_level(info)
    info.set_defaults(handler=run_info)
    listing = bsub.add_parser(
        "list",
        help="every version under ROOT: which is CURRENT, what each started from, which the gate refused",
        description="One line per complete version under ROOT, oldest first.",
    )
    listing.add_argument("root", type=Path, metavar="ROOT")
    add_log_level(listing)
    listing.set_defaults(handler=run_list)


def run_list(args: argparse.Namespace) -> int:
    from recsys.app.manifest_view import version_lines

    for line in version_lines(args.root):
        print(line)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from recsys.app.manifest_view import format_manifest, rejection_line
    from recsys.core.bundle import Bundle

    bundle = Bundle.open(args.root, args.version)
    if args.json:
        print(json.dumps(bundle.manifest, indent=2, sort_keys=True))
    else:
        print(format_manifest(bundle.manifest, bundle.path))
        refused = rejection_line(bundle)
        if refused:
            print(refused)
    if args.verify:
        bad = bundle.verify()
        if bad:
            raise DataLoss(f"{len(bad)} files differ from the manifest: {', '.join(bad[:5])}")
        print(f"verified {len(bundle.manifest.get('files', {}))} files")
    return 0
