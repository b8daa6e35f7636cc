"""``vitmerge store``: list and verify published bundles."""

from __future__ import annotations

import argparse

from server.cli.common import Parsers, SubParsers, store_layout


def cmd_store_list(args: argparse.Namespace) -> int:
    from model_store.bundle import BundleStore

    store = BundleStore(store_layout(args))
    current = store.current_version()
    versions = store.versions()
    if not versions:
        print(f"no bundles in {store.layout.bundles}")
    for v in versions:
        bundle = store.load(v, verify=False)
        mark = "*" if v == current else " "
        print(
            f"{mark} {v}  {bundle.manifest.method:<16} tasks={','.join(bundle.manifest.tasks)}  "
            f"{bundle.manifest.created_at}"
        )
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    from model_store.bundle import BundleStore

    store = BundleStore(store_layout(args))
    bundle = store.load(args.version)
    print(f"bundle {bundle.version} OK ({len(bundle.manifest.files)} files verified)")
    return 0


def register(sub: SubParsers, parsers: Parsers) -> None:
    """Add this group's commands to the ``vitmerge`` parser."""
    common = parsers.common
    store = sub.add_parser("store", help="inspect merged bundles").add_subparsers(dest="store_command", required=True)
    p = store.add_parser("list", parents=[common], help="list bundle versions (* = CURRENT)")
    p.set_defaults(func=cmd_store_list)
    p = store.add_parser("verify", parents=[common], help="verify a bundle's hashes")
    p.add_argument("version", nargs="?", default=None, help="version (default: CURRENT)")
    p.set_defaults(func=cmd_store_verify)
