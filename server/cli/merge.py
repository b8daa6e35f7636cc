"""``vitmerge merge`` and ``vitmerge methods``: merge a zoo into a published bundle; list the methods."""

from __future__ import annotations

import argparse
import json

from server.cli.common import Parsers, SubParsers, any_zoo, store_layout


def parse_param(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise ValueError(f"--param expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value: object = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def parse_grid(items: list[str]) -> dict[str, list[object]]:
    """``--grid KEY=V1,V2`` items -> axes (values parsed as JSON where they are, else strings)."""
    grid: dict[str, list[object]] = {}
    for item in items:
        key, raw = parse_param(item)
        values = [parse_param(f"{key}={v}")[1] for v in str(raw).split(",") if v.strip()]
        if not values:
            raise ValueError(f"--grid {key}= has no values")
        grid[key] = values
    return grid


def cmd_merge(args: argparse.Namespace) -> int:
    from merging.pipeline import merge_and_publish, select_and_publish
    from merging.selection import format_selection
    from model_store.bundle import BundleStore
    from model_store.data.sources import Holdout
    from model_store.settings import StoreSettings
    from server.runtime.agreement import agreement_review, format_agreement, recorded_agreement
    from server.runtime.selection import HeldOutAgreement

    params = dict(parse_param(p) for p in args.param)
    zoo = any_zoo(args, args.zoo)
    store = BundleStore(store_layout(args), keep=StoreSettings().keep_versions)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    review = agreement_review(zoo, args.agreement_images) if args.agreement_images else None
    if args.grid and args.target_agreement is None:
        raise ValueError("--grid needs --target-agreement (the grid is what the target chooses from)")
    if args.target_agreement is not None:
        holdout = Holdout(args.holdout_fraction, args.holdout_seed)
        outcome, selection = select_and_publish(
            zoo,
            store,
            args.method,
            params,
            args.target_agreement,
            HeldOutAgreement(zoo, holdout),
            parse_grid(args.grid),
            tasks,
            holdout,
            progress=not args.quiet,
            make_current=not args.no_current,
            review=review,
        )
        print(
            f"chose {selection.chosen}: the smallest candidate whose {selection.measure} top-1 agreement with your "
            f"own models reaches {args.target_agreement} on every task's held-out calibration images "
            f"({100 * args.holdout_fraction:g}%, seed {args.holdout_seed}; no test image read to choose):\n"
            + format_selection(selection)
        )
    else:
        current = not args.no_current
        outcome = merge_and_publish(
            zoo, store, args.method, params, tasks, progress=not args.quiet, make_current=current, review=review
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
    p.add_argument(
        "--target-agreement",
        type=float,
        default=None,
        metavar="A",
        help="choose the method's settings without labels: publish the smallest bundle (stored bytes) of a grid of "
        "f / bits / router_k whose routed top-1 agreement with each task's own model reaches A on every task's "
        "held-out calibration images (e.g. 0.995)",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="with --target-agreement: the values of one swept parameter (repeatable; default: "
        "f=0.02,0.03,0.045,0.06,0.1 and bits=32,8,4 where the method has them)",
    )
    p.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.2,
        help="with --target-agreement: share of each task's calibration images held out to choose on, never fitted "
        "on (default 0.2)",
    )
    p.add_argument("--holdout-seed", type=int, default=0, help="seed of the held-out split (default 0)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.set_defaults(func=cmd_methods)
