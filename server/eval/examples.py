"""Ready-to-paste examples printed when ``vitmerge serve`` is up."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from server.eval.accuracy import bundle_test_sets
from server.runtime.bundle_reader import BundleReader
from server.runtime.engine import Engine


def write_examples(engine: Engine, directory: Path) -> dict[str, Path]:
    """One held-out TEST image per task that has test images (the bundle's test sources), as PNG files."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    sets = bundle_test_sets(BundleReader(engine.bundle))
    for task in engine.tasks:
        images = sets.get(task)
        if images is None or not len(images):
            continue
        path = directory / f"{task}.png"
        Image.fromarray(images.pixels(0)).save(path)
        out[task] = path
    return out


def ready_message(engine: Engine, base_url: str, examples: dict[str, Path], playground: bool = True) -> str:
    """What ``vitmerge serve`` prints once the model is ready: the bundle, the playground page, curl lines."""
    lines = [
        f"vitmerge: serving bundle {engine.version} ({engine.method}, tasks {', '.join(engine.tasks)}) on "
        f"{engine.device} at {base_url}  (API docs: {base_url}/docs)"
    ]
    if playground:
        lines.append(f"  open the playground in a browser (drop images, see the router's choice): {base_url}/")
    if examples:
        task, path = next(iter(examples.items()))
        lines.append("  try it (the gate picks the task):")
        lines.append(f"    curl -s -F image=@{path} {base_url}/v1/classify")
        lines.append("  or name the task and ask for the top 3 classes:")
        lines.append(f"    curl -s -F image=@{path} -F task={task} -F top_k=3 {base_url}/v1/classify")
    return "\n".join(lines)
