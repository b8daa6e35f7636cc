"""What every ``vitmerge`` command shares: the store, zoo lookups, the common flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from model_store.settings import StoreLayout, resolve_store

#: What ``parser.add_subparsers()`` returns (argparse has no public name for it).
SubParsers = argparse._SubParsersAction


@dataclass(frozen=True)
class Parsers:
    """Parent parsers commands inherit flags from."""

    common: argparse.ArgumentParser  # --store
    data_flags: argparse.ArgumentParser  # --calibration / --test


def parent_parsers() -> Parsers:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=None, help="store directory (default: $VITMERGE_STORE or ./store)")
    data_flags = argparse.ArgumentParser(add_help=False)
    data_flags.add_argument(
        "--calibration",
        default=None,
        metavar="SRC",
        help="unlabeled images: a folder, a CSV (path[,label]) or builtin:NAME",
    )
    data_flags.add_argument(
        "--test",
        default=None,
        metavar="SRC",
        help="labeled images: an ImageFolder (one folder per class), a CSV (path,label) or builtin:NAME",
    )
    return Parsers(common, data_flags)


def store_layout(args: argparse.Namespace) -> StoreLayout:
    return resolve_store(args.store)


def zoo_dir(args: argparse.Namespace, value: str) -> Path:
    """A zoo given as a directory path, or as a name inside the store's zoos/."""
    path = Path(value)
    if path.is_dir() or "/" in value or value.startswith("."):
        return path
    return store_layout(args).zoo(value)


def any_zoo(args: argparse.Namespace, value: str):
    """A zoo from a spec file (created in the store when missing or changed), a name or a directory."""
    from model_store.zoo import Zoo
    from model_store.zoo_spec import ensure_zoo, is_spec_file

    if is_spec_file(value):
        return ensure_zoo(value, store_layout(args).zoos, progress=not getattr(args, "quiet", False))
    return Zoo.load(zoo_dir(args, value))
