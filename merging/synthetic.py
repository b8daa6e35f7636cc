"""Bundles of real size from random weights, for the serving speed and memory benchmarks (never accuracy).

A synthetic zoo is ``theta_0`` of a timm architecture plus N task models ``theta_0 + delta_t`` (Gaussian
deltas) with random 10-class heads; :func:`publish_synthetic` merges it (TSV-C low-rank deltas or EMR) into a
typed bundle with a gate from :func:`synthetic_gate`, or (low-rank) with a backbone router whose head
:func:`synthetic_router` fits to the benchmark's images (SPEC section 8); :func:`mixed_batches` draws mixed-task
batches for it. Used by ``benchmarks/lowrank_serve.py``, ``serve.py``, ``vs_litserve.py``, ``gpu_lowrank.py`` and
``litserve_zoo.py``.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from merging.gating.backbone_router import shared_prefix_deltas
from merging.methods.emr import emr_merge
from merging.methods.tsv import LowRankDeltas, tsv_compress
from merging.pipeline import write_lowrank
from merging.types import StateDict
from model_store.architecture import build_gate, build_model, gate_state
from model_store.backbone_router import RouterHead, ViTPrefix, pool_tokens, prefix_keys
from model_store.bundle import BundleStore
from model_store.schema import (
    Architecture,
    BundleGateSpec,
    BundleRouterSpec,
    BundleSpec,
    BundleTask,
    EMRSpec,
    Preprocessing,
)

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


@torch.inference_mode()
def synthetic_router(
    arch: Architecture, base: StateDict, k: int, hidden: int, images: torch.Tensor, tasks: list[int], seed: int
) -> StateDict:
    """A backbone router head (``head/<name>``) on ``theta_0``'s tokens after block ``k`` that routes each of
    ``images`` to its entry of ``tasks``: the last layer fitted by least squares to one-hot targets (a random
    first layer with ``hidden``)."""
    z = pool_tokens(ViTPrefix(arch, k, base)(images))
    target = torch.nn.functional.one_hot(torch.tensor(tasks), int(max(tasks)) + 1).float()
    torch.manual_seed(seed)
    head = RouterHead(z.shape[1], target.shape[1], hidden)
    net = cast(Any, head.net)
    last = net if hidden == 0 else net[2]
    feats = z if hidden == 0 else net[1](net[0](z))
    sol = torch.linalg.lstsq(torch.cat([feats, torch.ones(len(feats), 1)], 1), 10 * (target - 0.5)).solution
    last.weight.copy_(sol[:-1].T)
    last.bias.copy_(sol[-1])
    return {f"head/{n}": t.detach().clone() for n, t in head.state_dict().items()}


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
    router: BundleRouterSpec | None = None,
    router_head: StateDict | None = None,
    deltas: LowRankDeltas | None = None,
) -> str:
    """Publish ``zoo`` (:func:`synthetic_zoo`'s) as a bundle with ``gate``: ``f`` given, TSV-C low-rank deltas at
    rank fraction ``f`` (the patch conv compressed too with ``conv``; ``deltas``: those, already made); None: EMR.
    With ``router`` (low-rank only), the backbone router whose head is ``router_head`` instead of the gate.
    Returns the version."""
    base, tuned, heads = zoo
    tasks = [f"task{i}" for i in range(len(tuned))]
    rgb = Preprocessing(size=size, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    draft = store.draft()
    draft.add_tensors("heads", {f"{t}/{k}": v for t, h in zip(tasks, heads) for k, v in h.items()})
    if router is None:
        draft.add_tensors("gate", gate)
    elif f is None or router_head is None:
        raise ValueError("a synthetic backbone router needs a low-rank bundle (f) and its head")
    fields: dict[str, Any] = {}
    if f is not None:
        deltas = deltas if deltas is not None else tsv_compress(base, tuned, f, conv=conv)
        if router is not None:
            if router.variant == "shared_prefix":
                deltas = shared_prefix_deltas(deltas, router.k)
            held = set(deltas.ranks) | set(deltas.shared)  # theta_0 in backbone.safetensors
            own = {f"theta0/{k}": base[k] for k in prefix_keys(list(base), router.k) if k not in held}
            draft.add_tensors("router", {**cast(StateDict, router_head), **own})
        fields["lowrank"] = write_lowrank(draft, deltas)
    else:
        merged = emr_merge(base, tuned)
        draft.add_tensors("base", base)
        draft.add_tensors("tau_unified", merged.tau_unified)
        masks = {f"{t}/{k}": v for t, packed in zip(tasks, merged.packed_masks) for k, v in packed.items()}
        draft.add_tensors("masks", masks)
        fields["emr"] = EMRSpec(rescalers=dict(zip(tasks, merged.rescalers)))
    gate_spec = BundleGateSpec(arch="efficientnet_lite0", preprocessing=rgb.model_copy(update={"size": gate_size}))
    spec = BundleSpec(  # validated with its kind's fields (a lowrank bundle's ranks, an EMR bundle's rescalers)
        kind="emr" if f is None else "lowrank",
        architecture=arch,
        preprocessing=rgb,
        tasks=[BundleTask(name=t, class_names=[str(c) for c in range(CLASSES)]) for t in tasks],
        gate=gate_spec if router is None else None,
        router=router,
        **fields,
    )
    draft.add_json("model", spec.model_dump(mode="json"))
    return store.publish(draft, method, tasks=tasks)
