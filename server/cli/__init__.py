"""The ``vitmerge`` command line.

Subcommands import their modules lazily so ``vitmerge --help`` stays fast and the
serving path never imports training code.

    vitmerge zoo build --preset tiny        build (or reuse) a demo zoo
    vitmerge zoo create SPEC.yaml           your checkpoints + images as a zoo
    vitmerge zoo data --zoo Z --task T ...  attach calibration/test images to a task
    vitmerge zoo list | zoo show NAME       inspect zoos in the store
    vitmerge import timm|hf|dinov2 ...      add real checkpoints to a zoo
    vitmerge merge --method emr             merge a zoo, publish a bundle
    vitmerge methods                        list merge methods
    vitmerge eval [--bundle V]              per-task accuracy of a bundle
    vitmerge bench accuracy --zoo tiny      every method's accuracy table + plots
    vitmerge store list | store verify      inspect merged bundles
    vitmerge serve                          the HTTP server (merges or loads the model)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from model_store.errors import ModelStoreError
from model_store.memory import limit_heap_fragmentation
from server.cli import evaluate, importing, merge, serve, store, zoo
from server.cli.common import parent_parsers
from server.cli.serve import serve_settings

__all__ = ["build_parser", "main", "serve_settings"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitmerge", description="Merged multi-task ViT inference server and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = parent_parsers()
    for group in (zoo, importing, merge, evaluate, store, serve):
        group.register(sub, parsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitmerge`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    limit_heap_fragmentation()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ModelStoreError, KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"vitmerge: error: {message}", file=sys.stderr)
        return 2
