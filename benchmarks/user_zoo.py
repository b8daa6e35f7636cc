"""Time from `vitmerge zoo create` to a served, routed model for a 2-task user zoo (CPU).

The user's side is played for real: two fine-tuned task models of the `tiny` demo zoo
(mnist, animals) and its base are exported as plain timm safetensors files, and their
calibration/test splits are written as user-style data (PNG files in a flat folder and an
ImageFolder for mnist, CSV manifests for animals). Then, as a user would, in fresh
processes::

    vitmerge zoo create spec.yaml --store S
    vitmerge serve --zoo spec.yaml --store S        # merges with the default (routed EMR), serves

and the clock stops when ``/readyz`` answers 200; one classify per task checks the gate
routes to the user's task names, and the user's test images are scored through ``/v1/classify``
(task not given). Writes ``benchmarks/results/user_zoo.{json,md}``; with ``--method M`` the
server merges with ``VITMERGE_DEFAULT_METHOD=M`` instead of its default and the results are
``user_zoo-M.{json,md}``.

    .venv/bin/python benchmarks/user_zoo.py [--method tsv_routed] [--score 200]

Feeds BENCHMARKS.md, section "Your own models and data: zoo create -> served routed model (issue 14)".
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from server.http.live import ServerProcess, free_port, terminate_as_interrupt
from server.http.readiness import wait_until_ready

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "benchmarks" / ".user-zoo"
TASKS = {"mnist": "digits-scan", "animals": "silhouettes"}  # zoo task -> the user's own task name


def _vitmerge() -> list[str]:
    script = Path(sys.executable).parent / "vitmerge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


def export_user_world() -> Path:
    """Checkpoints + images in the layouts a user has; returns the spec path."""
    from model_store.data.attach import calibration_set, test_set
    from model_store.zoo_build.presets import build_zoo

    zoo = build_zoo("tiny", REPO / "store" / "zoos" / "tiny").zoo
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "ckpt").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in zoo.backbone(zoo.base).items()}, WORK / "ckpt" / "base.safetensors")
    arch = zoo.metas[zoo.base].architecture
    tasks = []
    for task, user_name in tqdm(TASKS.items(), desc="export user data", unit="task"):
        state = {**zoo.backbone(task), **zoo.head(task)}
        save_file({k: v.contiguous() for k, v in state.items()}, WORK / "ckpt" / f"{user_name}.safetensors")
        classes = zoo.metas[task].class_names
        cal, test = calibration_set(zoo, task), test_set(zoo, task)
        assert cal is not None and test is not None
        data = WORK / "data" / user_name
        entry = {
            "name": user_name,
            "format": "timm",
            "model_name": arch.timm_name,
            "model_kwargs": arch.kwargs,
            "path": f"ckpt/{user_name}.safetensors",
            "classes": classes,
        }
        if task == "mnist":  # folders
            (data / "unlabeled").mkdir(parents=True)
            for i in range(len(cal)):
                Image.fromarray(cal.pixels(i)).save(data / "unlabeled" / f"{i:05d}.png")
            for i in range(len(test)):
                folder = data / "test" / classes[int(test.labels[i])]  # type: ignore[index]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(test.pixels(i)).save(folder / f"{i:05d}.png")
            entry.update(calibration=f"data/{user_name}/unlabeled", test=f"data/{user_name}/test")
        else:  # CSV manifests
            (data / "images").mkdir(parents=True)
            for part, images in (("calib", cal), ("test", test)):
                with open(data / f"{part}.csv", "w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["path", "label"])
                    for i in range(len(images)):
                        name = f"images/{part}-{i:05d}.png"
                        Image.fromarray(images.pixels(i)).save(data / name)
                        w.writerow([name, classes[int(images.labels[i])] if part == "test" else ""])  # type: ignore[index]
            entry.update(calibration=f"data/{user_name}/calib.csv", test=f"data/{user_name}/test.csv")
        tasks.append(entry)
    spec = {
        "name": "user-bench",
        "base": {
            "format": "timm",
            "model_name": arch.timm_name,
            "model_kwargs": arch.kwargs,
            "path": "ckpt/base.safetensors",
            "preprocessing": zoo.metas[zoo.base].preprocessing.model_dump(exclude={"size", "channels", "source"}),
        },
        "tasks": tasks,
    }
    for t in tasks:
        t["preprocessing"] = spec["base"]["preprocessing"]
    path = WORK / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def user_test_images(user_name: str) -> list[tuple[Path, str]]:
    """The user's labelled test images as written above: ``(path, class label)`` from either layout."""
    folder = WORK / "data" / user_name
    if (folder / "test").exists():  # ImageFolder
        return [(png, png.parent.name) for png in sorted((folder / "test").rglob("*.png"))]
    with open(folder / "test.csv", newline="") as f:
        return [(folder / row["path"], row["label"]) for row in csv.DictReader(f)]


def score(url: str, limit: int) -> dict[str, dict[str, float]]:
    """Per user task, over its first ``limit`` test images sent one per request, task NOT given:
    the share routed to the task, and the share with the task and the class both right."""
    out = {}
    for user_name in TASKS.values():
        images = user_test_images(user_name)[:limit]
        routed = right = 0
        for png, label in tqdm(images, desc=f"score {user_name} via /v1/classify", unit="img", leave=False):
            r = httpx.post(f"{url}/v1/classify", files={"image": (png.name, png.read_bytes())}, timeout=30)
            r.raise_for_status()
            pred = r.json()["predictions"][0]
            routed += pred["task"]["name"] == user_name
            right += pred["task"]["name"] == user_name and pred["class"]["label"] == label
        out[user_name] = {"images": len(images), "routed": routed / len(images), "accuracy": right / len(images)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default=None, help="VITMERGE_DEFAULT_METHOD for the server (default: its own)")
    ap.add_argument("--score", type=int, default=200, help="test images per task scored through /v1/classify")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.method:
        env["VITMERGE_DEFAULT_METHOD"] = args.method
    spec = export_user_world()
    store = WORK / "store"
    t0 = time.perf_counter()
    subprocess.run([*_vitmerge(), "zoo", "create", str(spec), "--store", str(store), "--quiet"], check=True, cwd=REPO)
    t_create = time.perf_counter() - t0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*_vitmerge(), "serve", "--zoo", str(spec), "--store", str(store), "--port", str(port), "--quiet"]
    desc = f"serve: merge ({args.method or 'default method'}) + load"
    with tqdm(desc=desc, unit="s", bar_format="{desc}: {elapsed}") as bar:

        def ready(server: ServerProcess) -> None:
            wait_until_ready(url, 3600, server.proc, server.read_log, poll_s=0.5, on_poll=bar.refresh)

        server = ServerProcess([*cmd, "--watch-interval", "0"], WORK / "serve.log", cwd=REPO, env=env, ready=ready)
    with server:
        t_ready = time.perf_counter() - t0
        answers = {}
        for user_name in TASKS.values():
            folder = WORK / "data" / user_name
            img = (
                next(iter(sorted((folder / "test").rglob("*.png"))))
                if (folder / "test").exists()
                else sorted((folder / "images").glob("test-*.png"))[0]
            )
            r = httpx.post(f"{url}/v1/classify", files={"image": (img.name, img.read_bytes())}, timeout=30).json()
            answers[user_name] = r["predictions"][0]["task"]["name"]
        scores = score(url, args.score)
        manifest = json.loads(next((store / "bundles").glob("v*/manifest.json")).read_text())
    counts = {t: {k: (v or {}).get("images") for k, v in d.items()} for t, d in manifest["extra"]["data"].items()}
    result = {
        "zoo_create_s": round(t_create, 1),
        "create_to_ready_s": round(t_ready, 1),
        "serve_to_ready_s": round(t_ready - t_create, 1),
        "method": manifest["method"],
        "params": manifest["params"],
        "images": counts,
        "gate_test_accuracy": manifest["extra"]["gate_test_accuracy"],
        "routed_answers": answers,
        "served_scores": scores,
        "cpu_count": os.cpu_count(),
        "command": " ".join([".venv/bin/python", "benchmarks/user_zoo.py", *sys.argv[1:]]),
    }
    stem = "user_zoo" + (f"-{args.method}" if args.method else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    gate = ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["gate_test_accuracy"].items())
    md = (
        f"| step | seconds |\n|---|---|\n| `vitmerge zoo create spec.yaml` | {result['zoo_create_s']} |\n"
        f"| `vitmerge serve --zoo spec.yaml` until /readyz (merge {result['method']} + gate training + load) | "
        f"{result['serve_to_ready_s']} |\n"
        f"| **zoo create -> served routed model** | **{result['create_to_ready_s']}** |\n\n"
        f"Images read (calibration / test): {json.dumps(counts)}; gate routing on the test images: {gate}; "
        f"one classify per task answered {answers}.\n\n"
        "Served, task not given (test images sent one per request to `/v1/classify`): "
        + "; ".join(
            f"{t} {v['images']} images, routed {100 * v['routed']:.1f}%, "
            f"task and class right {100 * v['accuracy']:.1f}%"
            for t, v in scores.items()
        )
        + ".\n"
    )
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    with terminate_as_interrupt():  # SIGTERM, too, stops the server started
        main()
