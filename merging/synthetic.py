"""Bundles of real size from random weights, for the serving speed and memory benchmarks (never accuracy).

A synthetic zoo is ``theta_0`` of a timm architecture plus N task models ``theta_0 + delta_t`` (Gaussian
deltas) with random 10-class heads; :func:`publish_synthetic` merges it (TSV-C low-rank deltas or EMR) into a
typed bundle with a gate from :func:`synthetic_gate`; :func:`mixed_batches` draws mixed-task batches for it.
Used by ``benchmarks/lowrank_serve.py``, ``serve.py``, ``vs_litserve.py``, ``gpu_lowrank.py`` and ``litserve_zoo.py``.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from merging.methods.emr import emr_merge
from merging.methods.tsv import tsv_compress
from merging.pipeline import write_lowrank
from merging.types import StateDict
from model_store.architecture import build_gate, build_model, gate_state
from model_store.bundle import BundleStore
from model_store.schema import Architecture, BundleGateSpec, BundleSpec, BundleTask, EMRSpec, Preprocessing

#: classes of every synthetic task
CLASSES = 10
#: the real-size architectures of the serving benchmarks: name -> (architecture, input size)
ARCHS: dict[str, tuple[Architecture, int]] = {
    # the dinov2-s14 zoo's backbone at its 56 px input (BENCHMARKS.md): 21.5 M parameters, 17 tokens
    "vit_s14": (Architecture(timm_name="vit_small_patch14_dinov2", kwargs={"img_size": 56}), 56),
    # ViT-B/16 at 224 px: 86 M parameters, 197 tokens
    "vit_b16": (Architecture(timm_name="vit_base_patch16_224"), 224),
}


def mixed_batches(
    n_tasks: int, size: int, gate_pool: list[torch.Tensor], batch: int, count: int, seed: int
) -> list[dict]:
    """Shuffled mixed-task batches: images, each image's task and a gate input the gate routes to it."""
    g = torch.Generator().manual_seed(seed)
    out, used = [], [0] * n_tasks
    for _ in range(count):
        tasks = torch.randint(0, n_tasks, (batch,), generator=g).tolist()
        gate_images = []
        for t in tasks:
            gate_images.append(gate_pool[t][used[t] % len(gate_pool[t])])
            used[t] += 1
        out.append({"x": torch.randn(batch, 3, size, size, generator=g), "g": torch.stack(gate_images), "t": tasks})
    return out


def synthetic_zoo(
    arch: Architecture, n: int, seed: int, delta: float = 1e-2
) -> tuple[StateDict, list[StateDict], list[StateDict]]:
    """theta_0, N task backbones (theta_0 + ``delta`` x Gaussian noise) and N 10-class heads."""
    torch.manual_seed(seed)
    model = build_model(arch, 0)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tuned = [{k: v + delta * torch.randn_like(v) for k, v in base.items()} for _ in range(n)]
    dim = int(model.num_features)  # type: ignore[arg-type]
    heads = [{"head.weight": 0.02 * torch.randn(CLASSES, dim), "head.bias": torch.zeros(CLASSES)} for _ in range(n)]
    return base, tuned, heads


@torch.inference_mode()
def synthetic_gate(n_tasks: int, gate_size: int, seed: int, pool: int = 512) -> tuple[StateDict, list[torch.Tensor]]:
    """A random EfficientNet-Lite0 gate whose classifier bias is centred on a pool of random images,
    and those images sorted by the task the gate routes them to.

    A random gate sends nearly every random image to ONE task (measured: 400 of 400), so a "routed"
    batch would be a one-task batch -- far cheaper than the shuffled mix the task-given rows run.
    Centring the logits spreads the routing; a benchmark then takes, for each image's task, a gate
    image routed to that task, so routed and task-given rows run the same task mix.
    """
    torch.manual_seed(seed)
    gate = build_gate("efficientnet_lite0", n_tasks).eval()
    images = torch.randn(pool, 3, gate_size, gate_size)
    head = cast(Any, gate).get_classifier()
    assert isinstance(head, torch.nn.Linear) and head.bias is not None
    head.bias.sub_(gate(images.contiguous(memory_format=torch.channels_last)).mean(0))
    routed = gate(images.contiguous(memory_format=torch.channels_last)).argmax(1)
    by_task = [images[routed == t] for t in range(n_tasks)]
    empty = [t for t, imgs in enumerate(by_task) if len(imgs) == 0]
    if empty:
        raise RuntimeError(f"the synthetic gate routes none of {pool} images to tasks {empty}: raise the pool")
    return gate_state(gate), by_task


def publish_synthetic(
    store: BundleStore,
    method: str,
    arch: Architecture,
    size: int,
    zoo: tuple[StateDict, list[StateDict], list[StateDict]],
    gate: StateDict,
    f: float | None = None,
    conv: bool = False,
    gate_size: int = 64,
) -> str:
    """Publish ``zoo`` (:func:`synthetic_zoo`'s) as a bundle with ``gate``: ``f`` given, TSV-C low-rank deltas at
    rank fraction ``f`` (the patch conv compressed too with ``conv``); None: EMR. Returns the version."""
    base, tuned, heads = zoo
    tasks = [f"task{i}" for i in range(len(tuned))]
    rgb = Preprocessing(size=size, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    draft = store.draft()
    draft.add_tensors("heads", {f"{t}/{k}": v for t, h in zip(tasks, heads) for k, v in h.items()})
    draft.add_tensors("gate", gate)
    kind: dict[str, Any] = {}  # the kind's own section: the spec is validated with it
    if f is not None:
        kind["lowrank"] = write_lowrank(draft, tsv_compress(base, tuned, f, conv=conv))
    else:
        merged = emr_merge(base, tuned)
        draft.add_tensors("base", base)
        draft.add_tensors("tau_unified", merged.tau_unified)
        masks = {f"{t}/{k}": v for t, packed in zip(tasks, merged.packed_masks) for k, v in packed.items()}
        draft.add_tensors("masks", masks)
        kind["emr"] = EMRSpec(rescalers=dict(zip(tasks, merged.rescalers)))
    spec = BundleSpec(
        kind="emr" if f is None else "lowrank",
        architecture=arch,
        preprocessing=rgb,
        tasks=[BundleTask(name=t, class_names=[str(c) for c in range(CLASSES)]) for t in tasks],
        gate=BundleGateSpec(arch="efficientnet_lite0", preprocessing=rgb.model_copy(update={"size": gate_size})),
        **kind,
    )
    draft.add_json("model", BundleSpec.model_validate(spec.model_dump()).model_dump(mode="json"))
    return store.publish(draft, method, tasks=tasks)
