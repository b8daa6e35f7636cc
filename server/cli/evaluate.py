"""``vitmerge eval`` and ``vitmerge bench accuracy``: a bundle's accuracy through the serving Engine;
every method's table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_store.architecture import GATE_ARCHS
from model_store.memory import limit_heap_fragmentation
from server.cli.common import Parsers, SubParsers, store_layout, zoo_dir


def cmd_eval(args: argparse.Namespace) -> int:
    from model_store.bundle import BundleStore
    from server.eval.accuracy import evaluate_bundle, evaluate_individual, evaluate_routed, format_table, source_zoo
    from server.runtime.engine import Engine, EngineOptions

    bundle = BundleStore(store_layout(args)).load(args.bundle)
    engine = Engine(bundle, EngineOptions(mixing=args.mixing))
    models = engine.models
    label = f"{bundle.manifest.method} ({bundle.version})"
    if args.agreement:
        return _agreement(engine, args)
    if args.routed:
        routed = evaluate_routed(engine, limit=args.limit)
        rows = {
            "gate (task id)": {t: r["gate"] if r else None for t, r in routed.items()},
            f"{bundle.manifest.method} routed ({bundle.version})": {
                t: r["routed"] if r else None for t, r in routed.items()
            },
        }
        print(format_table(rows, models.tasks))
        _no_test_note(routed)
        return 0
    accs = evaluate_bundle(engine, limit=args.limit, progress=not args.quiet)
    zoo = source_zoo(models)
    reference = evaluate_individual(models, zoo, limit=args.limit, progress=not args.quiet) if zoo is not None else None
    rows = {"individual": reference, label: accs} if reference is not None else {label: accs}
    print(format_table(rows, models.tasks, reference))
    if reference is None:
        print(f"(source zoo {models.bundle.manifest.zoo.get('path')} not found: no individual models to normalise by)")
    _no_test_note(accs)
    return 0


def _agreement(engine, args: argparse.Namespace) -> int:
    """``vitmerge eval --agreement``: top-1 agreement and KL with each task's own model, no labels read."""
    from server.eval.accuracy import source_zoo
    from server.runtime.agreement import format_agreement, measure_agreement

    zoo = source_zoo(engine.models)
    if zoo is None:
        print(
            f"source zoo {engine.bundle.manifest.zoo.get('path')} not found: agreement needs your own models",
            file=sys.stderr,
        )
        return 2
    rows = measure_agreement(engine, zoo, limit=args.limit, progress=not args.quiet)
    print(f"{engine.method} ({engine.version}) vs your own models, on each task's images (no labels read):")
    print(format_agreement(rows))
    return 0


def _no_test_note(accs: dict) -> None:
    missing = [t for t, a in accs.items() if a is None]
    if missing:
        print(
            f"no test data for: {', '.join(missing)} (add it with `vitmerge zoo data --task T --test SRC`; merging "
            "still works)"
        )


def cmd_bench_accuracy(args: argparse.Namespace) -> int:
    from model_store.zoo import Zoo
    from model_store.zoo_build.presets import PRESETS, build_zoo
    from server.eval.bench import SECTIONS, AccuracyBenchConfig, run_accuracy_bench
    from server.eval.report import render_markdown, write_report

    limit_heap_fragmentation()
    from model_store.zoo_spec import ensure_zoo, is_spec_file

    if args.zoo in PRESETS:
        zoo = build_zoo(args.zoo, store_layout(args).zoo(args.zoo), progress=not args.quiet).zoo
    elif is_spec_file(args.zoo):
        zoo = ensure_zoo(args.zoo, store_layout(args).zoos, progress=not args.quiet)
    else:
        zoo = Zoo.load(zoo_dir(args, args.zoo))
    cfg = AccuracyBenchConfig(
        m_values=tuple(int(m) for m in args.m.split(",") if m),
        gate_archs=tuple(a for a in args.gate_archs.split(",") if a),
        gate_epochs=args.gate_epochs,
        gate_size=args.gate_size,
        gate_max_images=args.gate_max_images,
        limit=args.limit,
        seed=args.seed,
        scaling=not args.no_scaling,
        tsv_fractions=tuple(float(f) for f in args.tsv_fractions.split(",") if f),
        tsv_conv=args.tsv_conv,
        sections=SECTIONS if args.sections == "all" else tuple(x for x in args.sections.split(",") if x),
        store=args.keep_bundles,
    )
    result = run_accuracy_bench(zoo, cfg, progress=not args.quiet)
    command = (
        "vitmerge bench accuracy " + " ".join(sys.argv[3:])
        if sys.argv[1:3] == ["bench", "accuracy"]
        else f"vitmerge bench accuracy --zoo {args.zoo}"
    )
    files = write_report(
        result, Path(args.out), command.strip(), Path(args.benchmarks_md) if args.benchmarks_md else None
    )
    print(render_markdown(result, command))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def register(sub: SubParsers, parsers: Parsers) -> None:
    """Add this group's commands to the ``vitmerge`` parser."""
    common = parsers.common
    p = sub.add_parser("eval", parents=[common], help="per-task test accuracy of a bundle (task given)")
    p.add_argument("--bundle", default=None, help="version (default: CURRENT)")
    p.add_argument("--limit", type=int, default=None, help="test images per task (default: all)")
    p.add_argument("--routed", action="store_true", help="task NOT given: the bundle's gate routes mixed-task batches")
    p.add_argument(
        "--agreement",
        action="store_true",
        help="no labels: how often the bundle's top-1 (task given and routed) equals each task's own model's, and "
        "the mean KL, on the task's test images (calibration images when it has none)",
    )
    p.add_argument(
        "--mixing",
        "--strategy",  # the flag's name before "strategy" came to mean the engine's per-kind executor only
        dest="mixing",
        choices=["exact", "sparse"],
        default="exact",
        help="gated bundles: how experts are mixed per image",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("accuracy", parents=[common], help="accuracy of every merge method on a zoo (tables + plots)")
    p.add_argument(
        "--zoo",
        default="tiny",
        help="preset (built if missing: tiny, test, dinov2-s14), zoo spec YAML, zoo name in the store, or directory",
    )
    p.add_argument("--limit", type=int, default=None, help="test images per task (default: all)")
    p.add_argument(
        "--m", default="0,1,3,5", help="comma-separated m values for the gated rows (those above the depth are skipped)"
    )
    p.add_argument("--gate-epochs", type=int, default=10)
    p.add_argument("--gate-size", type=int, default=64)
    p.add_argument("--gate-max-images", type=int, default=1000, help="calibration images per task for each gate")
    p.add_argument(
        "--gate-archs", default=",".join(GATE_ARCHS), help="comma-separated; the first is used for routed EMR scaling"
    )
    p.add_argument("--no-scaling", action="store_true", help="skip the accuracy-vs-N rows")
    p.add_argument(
        "--tsv-fractions", default="0.05,0.1", help="comma-separated TSV-C rank fractions f (1/N is always added)"
    )
    p.add_argument(
        "--tsv-conv", action="store_true", help="TSV-C also compresses the patch-embedding conv (tsv_c's conv=true)"
    )
    p.add_argument(
        "--sections",
        default="all",
        help="comma-separated groups of rows to run (Individual always does): static, emr, tsv, gating_avg, "
        "gating_regmean; default all",
    )
    p.add_argument(
        "--keep-bundles",
        default=None,
        metavar="DIR",
        help="publish every row's bundle into the store at DIR and keep it (rows name their version: "
        "`vitmerge eval --store DIR --bundle V` reproduces a row); default: a temporary store, deleted",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON, markdown and PNG files")
    p.add_argument(
        "--benchmarks-md", default="BENCHMARKS.md", help="file whose section for this zoo is replaced ('' = none)"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench_accuracy)
