"""``vitmerge merge`` and ``vitmerge methods``: merge a zoo into a published bundle; list the methods."""

from __future__ import annotations

import argparse
import json

from server.cli.common import Parsers, SubParsers, any_zoo, store_layout


def _parse_param(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise ValueError(f"--param expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value: object = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def cmd_merge(args: argparse.Namespace) -> int:
    from merging.pipeline import merge_and_publish
    from model_store.bundle import BundleStore
    from model_store.settings import StoreSettings
    from server.runtime.agreement import agreement_review, format_agreement, recorded_agreement

    params = dict(_parse_param(p) for p in args.param)
    zoo = any_zoo(args, args.zoo)
    store = BundleStore(store_layout(args), keep=StoreSettings().keep_versions)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    review = agreement_review(zoo, args.agreement_images) if args.agreement_images else None
    outcome = merge_and_publish(
        zoo, store, args.method, params, tasks, progress=not args.quiet, make_current=not args.no_current, review=review
    )
    print(
        f"published bundle {outcome.version} ({args.method}, tasks {','.join(outcome.tasks)}) in "
        f"{store.layout.bundles / outcome.version}"
    )
    rows = recorded_agreement(store.load(outcome.version, verify=False))
    if rows:
        print("agreement with your own models (top-1 equal, no labels read):\n" + format_agreement(rows))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from merging.method_index import REGISTRY

    for name, spec in sorted(REGISTRY.items()):
        params = ", ".join(f"{k}={f.default!r}" for k, f in spec.params.model_fields.items()) or "-"
        data = "calibration images" if spec.needs_calibration else "data-free"
        print(f"{name:<16} {data:<18} params: {params}\n{'':<16} {spec.description}")
    return 0


def register(sub: SubParsers, parsers: Parsers) -> None:
    """Add this group's commands to the ``vitmerge`` parser."""
    common = parsers.common
    p = sub.add_parser("merge", parents=[common], help="merge a zoo and publish a bundle")
    p.add_argument("--zoo", default="tiny", help="zoo name in the store, or a directory (default: tiny)")
    p.add_argument("--method", required=True, help="merge method (see `vitmerge methods`)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter (repeatable)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the zoo's tasks")
    p.add_argument("--no-current", action="store_true", help="publish without switching CURRENT")
    p.add_argument(
        "--agreement-images",
        type=int,
        default=256,
        metavar="N",
        help="record the bundle's top-1 agreement with each task's own model on its first N test (else "
        "calibration) images in the manifest (0: skip; default 256)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.set_defaults(func=cmd_methods)
