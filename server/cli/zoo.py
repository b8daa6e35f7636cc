"""``vitmerge zoo``: build a preset zoo, create one from a spec, attach data, list and show zoos."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from server.cli.common import Parsers, SubParsers, store_layout, zoo_dir


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from model_store.zoo_build.presets import build_zoo

    target = Path(args.out) if args.out else store_layout(args).zoo(args.preset)
    report = build_zoo(args.preset, target, force=args.force, progress=not args.quiet, device=args.device)
    zoo = report.zoo
    state = (
        "copied the zoo shipped in the package; --force retrains it"
        if report.embedded
        else "cached, nothing to do"
        if report.cached
        else f"trained {', '.join(report.trained) or 'nothing'}"
    )
    if report.reused and not report.cached:
        state += f"; reused {', '.join(report.reused)}"
    print(f"zoo '{zoo.name}' at {zoo.root} ({state}; {report.seconds:.1f} s)")
    base = zoo.metas[zoo.base]
    origin = (
        f"pretrained on {base.provenance.dataset} (test acc {base.provenance.test_accuracy:.3f})"
        if base.provenance.test_accuracy is not None
        else f"from {base.provenance.source}"
    )
    print(f"  base: {base.architecture.timm_name} {base.architecture.kwargs}, {origin}")
    for task in zoo.tasks:
        meta = zoo.metas[task]
        print(f"  task {task:<8} {meta.num_classes:>3} classes  test acc {meta.provenance.test_accuracy:.3f}")
    return 0


def cmd_zoo_create(args: argparse.Namespace) -> int:
    from model_store.zoo_spec import create_zoo

    zoo = create_zoo(args.spec, store_layout(args).zoos, name=args.name, force=args.force, progress=not args.quiet)
    print(f"created zoo '{zoo.name}' at {zoo.root} from {args.spec}")
    _print_zoo_data(zoo)
    return 0


def _print_zoo_data(zoo) -> None:
    base = zoo.metas[zoo.base]
    print(
        f"  base: {base.architecture.timm_name} {base.architecture.kwargs}  input {base.preprocessing.size} px, "
        f"{base.preprocessing.channels} channel(s); {base.preprocessing.describe()}"
    )
    for task in zoo.tasks:
        meta, data = zoo.metas[task], zoo.task_data(task)
        cal = data.calibration.describe() if data.calibration else "none"
        test = data.test.describe() if data.test else "none"
        print(f"  task {task:<12} {meta.num_classes:>3} classes  calibration: {cal}  test: {test}")
        if not meta.preprocessing.pixels_equal(base.preprocessing):
            print(f"       its own preprocessing: {meta.preprocessing.describe()}")
    if zoo.manifest.gate is not None:
        print(f"  gate: {zoo.manifest.gate.arch} (init: {zoo.manifest.gate.source or 'default'})")


def cmd_zoo_data(args: argparse.Namespace) -> int:
    from model_store.data.attach import attach_data

    zoo = attach_data(zoo_dir(args, args.zoo), args.task, args.calibration, args.test)
    print(f"zoo '{zoo.name}': data of task '{args.task}' updated")
    _print_zoo_data(zoo)
    return 0


def cmd_zoo_list(args: argparse.Namespace) -> int:
    from model_store.zoo import Zoo

    root = store_layout(args).zoos
    names = sorted(p.name for p in root.iterdir() if (p / "zoo.json").exists()) if root.is_dir() else []
    if not names:
        print(f"no zoos in {root} (build one with `vitmerge zoo build --preset tiny`)")
    for name in names:
        zoo = Zoo.load(root / name, require_base=False)
        print(f"{name}: base={zoo.manifest.base} tasks={','.join(zoo.tasks)}")
    return 0


def _projection(zoo) -> str:
    """Where a CLIP zoo's visual projection lives, and which task models fine-tuned their own."""
    import torch

    from model_store.architecture import PROJECTION_KEY

    dims = {m.architecture.projection_dim for m in zoo.metas.values()}
    if dims == {None} or not dims:
        return "none"
    width = {m.architecture.kwargs.get("embed_dim") for m in zoo.metas.values()}
    where = (
        f"in each model's backbone ('{PROJECTION_KEY}', {'/'.join(map(str, dims))} x "
        f"{'/'.join(map(str, width))}), then L2-normalised"
    )
    names = [n for n in [zoo.manifest.base, *zoo.tasks] if n]
    ref = zoo.backbone_lazy(names[0])[PROJECTION_KEY]
    own = [t for t in zoo.tasks if t != names[0] and not torch.equal(zoo.backbone_lazy(t)[PROJECTION_KEY], ref)]
    if not own:
        return f"{where}; the same in every model"
    differ = f"fine-tuned by {len(own)} of {len(zoo.tasks)} task(s)" if zoo.manifest.base else "differs in task(s)"
    return (
        f"{where}; {differ} ({', '.join(own)}): each task's own, merged as a 2-D weight like every linear "
        "layer (EMR masks, TSV low-rank factors, a gated expert per task, static merges)"
    )


def cmd_zoo_show(args: argparse.Namespace) -> int:
    from model_store.zoo import Zoo

    zoo = Zoo.load(zoo_dir(args, args.zoo), require_base=False)
    out = {
        "manifest": zoo.manifest.model_dump(mode="json"),
        "projection": _projection(zoo),
        "models": {n: m.model_dump(mode="json") for n, m in zoo.metas.items()},
    }
    print(json.dumps(out, indent=2))
    return 0


def register(sub: SubParsers, parsers: Parsers) -> None:
    """Add this group's commands to the ``vitmerge`` parser."""
    common, data_flags = parsers.common, parsers.data_flags
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
    p = zoo.add_parser("data", parents=[common, data_flags], help="attach calibration/test images to a task of a zoo")
    p.add_argument("--zoo", required=True, help="zoo name in the store, or a directory")
    p.add_argument("--task", required=True)
    p.set_defaults(func=cmd_zoo_data)
    p = zoo.add_parser("list", parents=[common], help="list the store's zoos")
    p.set_defaults(func=cmd_zoo_list)
    p = zoo.add_parser("show", parents=[common], help="print a zoo's metadata")
    p.add_argument("zoo", help="zoo name in the store, or a directory")
    p.set_defaults(func=cmd_zoo_show)
