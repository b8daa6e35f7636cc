"""CLIP zoos whose task towers each fine-tuned their own visual projection (issue 33).

Every tower is built by ``transformers`` or ``open_clip`` itself at a tiny size (width 32/64,
depth 2, 32 px) with every weight moved, the projection included; nothing is downloaded. Every
reference is the library-run task model: ``softmax(scale * (W normalize(image embedding) + b))``.
The inputs are model-input tensors (no image decoding or preprocessing is under test here).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from server_helpers import require

from merging.different_init.different_init_methods import CATALOG as DIFFERENT_INIT
from merging.gating.plan import expert_stacks, gating_plan
from merging.method_index import REGISTRY
from merging.methods.fisher import estimate_fisher
from merging.methods.regmean import collect_grams, regmean
from merging.pipeline import merge_and_publish, merge_context
from model_store.architecture import PROJECTION_KEY
from model_store.bundle import BundleStore
from model_store.importers.clip import import_clip
from model_store.importers.common import ImportTarget
from model_store.settings import StoreLayout
from model_store.zoo import Zoo
from server.cli import main
from server.runtime.engine import Engine
from server.runtime.gated_vit import GatedViT
from server.runtime.layers.gated import GatedLinear

transformers = require("transformers", "pip install -e '.[test]'")
TASKS = {"birds": ["owl", "jay", "tit"], "cars": ["van", "bus"], "pets": ["cat", "dog", "rat", "eel"]}
#: the heads' logit scale: with unit-norm class rows the logits stay within +-SCALE, so the reference
#: probabilities are far from one-hot and a 1e-3 check on them means something
SCALE = 10.0
TOL = 1e-3  # the bound; measured <= 7.2e-7 on every exact check here (one-task EMR, full-rank TSV-C)


@dataclass
class ClipZoo:
    """A zoo of a base and one task tower per TASKS entry, and the library-run answers to check against."""

    zoo: Zoo
    x: torch.Tensor
    want: dict[str, torch.Tensor]  # task -> (images, classes) probabilities of the task model
    base_projection: dict[str, torch.Tensor]  # task -> the same, its tower run with the BASE's projection
    projections: dict[str, torch.Tensor]  # model -> its projection, out x in (timm's orientation)


def _tune(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Move EVERY weight (a fine-tune of the whole tower, its projection included)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data.add_(scale * torch.randn(p.shape, generator=gen))


def _head(path: Path, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-shot-like head (unit-norm class rows, a small bias), saved with CLIP's log logit scale."""
    gen = torch.Generator().manual_seed(100 + seed)
    w = F.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    b = 0.1 * torch.randn(classes, generator=gen)
    save_file({"weight": w, "bias": b, "logit_scale": torch.tensor(np.log(SCALE))}, path)
    return w, b


def _probs(emb: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (SCALE * (F.normalize(emb, dim=-1) @ head[0].T + head[1])).softmax(-1)


Embed = Callable[[torch.nn.Module, torch.Tensor, torch.nn.Module | None], torch.Tensor]


def _build_zoo(
    root: Path,
    base: torch.nn.Module,
    save: Callable[[torch.nn.Module, str], Path],
    embed: Embed,
    projection: Callable[[torch.nn.Module], torch.Tensor],
) -> ClipZoo:
    """Import ``base`` and a fine-tuned copy per task; ``embed(model, x, projection_of)`` is the library's
    image embedding (with another model's projection when given)."""
    zoo_dir = root / "zoo"
    import_clip(save(base, "base"), ImportTarget(zoo_dir, "base", role="base"))
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want, swapped, projections = {}, {}, {"base": projection(base)}
    for i, (task, classes) in enumerate(TASKS.items()):
        tuned = copy.deepcopy(base)
        _tune(tuned, 10 + i, 0.05)
        head = _head(root / f"{task}.safetensors", len(classes), 16, i)
        import_clip(
            save(tuned, task), ImportTarget(zoo_dir, task, class_names=classes), head=root / f"{task}.safetensors"
        )
        with torch.no_grad():
            want[task] = _probs(embed(tuned, x, None), head)
            swapped[task] = _probs(embed(tuned, x, base), head)
        projections[task] = projection(tuned)
    return ClipZoo(Zoo.load(zoo_dir), x, want, swapped, projections)


@pytest.fixture(scope="module")
def hf_zoo(tmp_path_factory) -> ClipZoo:
    """HF CLIPVisionModelWithProjection towers (quick_gelu), each with its own fine-tuned projection."""
    root = tmp_path_factory.mktemp("clip_hf")
    config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    torch.manual_seed(0)
    base = transformers.CLIPVisionModelWithProjection(config).eval()
    _tune(base, 0, 0.05)

    def save(model: torch.nn.Module, name: str) -> Path:
        model.save_pretrained(root / name)
        return root / name

    def embed(model, x: torch.Tensor, other) -> torch.Tensor:
        if other is None:
            return model(pixel_values=x).image_embeds
        return other.visual_projection(model.vision_model(pixel_values=x).pooler_output)

    return _build_zoo(root, base, save, embed, lambda m: m.visual_projection.weight.detach().clone())


@pytest.fixture(scope="module")
def open_clip_zoo(tmp_path_factory) -> ClipZoo:
    """open_clip CLIP checkpoint files (gelu, 32-wide heads from open_clip_config.json), each its own projection."""
    open_clip = require("open_clip", "pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("clip_open_clip")
    cfg = {
        "embed_dim": 16,
        "quick_gelu": False,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(3)
    base = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=False).eval()
    _tune(base, 3, 0.02)

    def save(model: torch.nn.Module, name: str) -> Path:
        torch.save(model.state_dict(), root / f"{name}.pt")
        return root / f"{name}.pt"

    def embed(model, x: torch.Tensor, other) -> torch.Tensor:
        if other is None:
            return model.encode_image(x)
        tower = copy.deepcopy(model.visual)
        tower.proj = other.visual.proj
        return tower(x)

    return _build_zoo(root, base, save, embed, lambda m: m.visual.proj.detach().t().contiguous())


FAMILIES = ["hf_zoo", "open_clip_zoo"]


def _served(engine: Engine, x: torch.Tensor, task: int) -> torch.Tensor:
    return torch.stack([o.probabilities for o in engine.predict(x, [task] * len(x))])


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_hf_towers_import_with_their_own_projections(hf_zoo, capsys):
    """Each task keeps its own projection (no refusal); `zoo show` says the tasks fine-tuned it."""
    zoo = hf_zoo.zoo
    for name in ["base", *TASKS]:
        assert torch.equal(zoo.backbone(name)[PROJECTION_KEY], hf_zoo.projections[name])
        if name != "base":
            assert not torch.equal(hf_zoo.projections[name], hf_zoo.projections["base"])
            with torch.no_grad():
                got = zoo.build_model(name)(hf_zoo.x).softmax(-1)
            assert _diff(got, hf_zoo.want[name]) < 1e-5
    capsys.readouterr()
    assert main(["zoo", "show", str(zoo.root)]) == 0
    shown = json.loads(capsys.readouterr().out)["projection"]
    assert shown.startswith(f"in each model's backbone ('{PROJECTION_KEY}', 16 x 32)")
    assert "fine-tuned by 3 of 3 task(s) (birds, cars, pets)" in shown


@pytest.mark.parametrize("family", FAMILIES)
def test_one_task_emr_and_full_rank_tsv_reproduce_each_task_model(family, request, tmp_path):
    """A one-task EMR bundle per task and one full-rank TSV-C bundle: every task model's own probabilities."""
    clip: ClipZoo = request.getfixturevalue(family)
    store = BundleStore(StoreLayout(tmp_path), keep=10)
    for task in TASKS:
        # the check can fail: the base's projection moves these probabilities by far more than TOL
        assert _diff(clip.base_projection[task], clip.want[task]) > 10 * TOL
        bundle = store.load(merge_and_publish(clip.zoo, store, "emr", tasks=[task], progress=False).version)
        assert PROJECTION_KEY in bundle.tensors("tau_unified")
        assert _diff(_served(Engine(bundle), clip.x, 0), clip.want[task]) < TOL
    bundle = store.load(merge_and_publish(clip.zoo, store, "tsv_c", {"f": 1.0}, progress=False).version)
    assert bundle.json("model")["lowrank"]["ranks"][PROJECTION_KEY] == 16  # low-rank factors at full rank
    engine = Engine(bundle)
    for t, task in enumerate(TASKS):
        assert _diff(_served(engine, clip.x, t), clip.want[task]) < TOL


#: every data-free method; ``lora`` takes these full fine-tunes at max_fraction 1 (its default refuses them)
DATA_FREE = sorted(n for n, s in REGISTRY.items() if not s.needs_calibration)
PARAMS = {"lora": {"max_fraction": 1.0}, "tsv_c": {"f": 1.0}}
EXACT = {"tsv_c", "lora"}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_data_free_method_merges_the_projections_and_serves(family, request, tmp_path):
    """Each data-free method merges the per-task projections as a 2-D weight, and the Engine serves every task."""
    clip: ClipZoo = request.getfixturevalue(family)
    # a new data-free method joins this list: it must show here how it treats a per-task projection
    assert set(DATA_FREE) == {"avg", "task_arithmetic", "ties", "dare_ta", "dare_ties", "emr", "tsv_c", "lora", "tsv_m"}
    store = BundleStore(StoreLayout(tmp_path), keep=20)
    base, tasks = clip.projections["base"], [clip.projections[t] for t in TASKS]
    for method in DATA_FREE:
        bundle = store.load(merge_and_publish(clip.zoo, store, method, PARAMS.get(method), progress=False).version)
        engine = Engine(bundle)
        if engine.kind == "static":
            merged = bundle.tensors("backbone")[PROJECTION_KEY]
            assert not torch.equal(merged, base), method  # the task vectors reached the projection
            if method == "avg":
                torch.testing.assert_close(merged, torch.stack(tasks).mean(0))
            if method == "task_arithmetic":
                torch.testing.assert_close(merged, base + 0.3 * sum(t - base for t in tasks))
        elif engine.kind == "emr":  # a mask per task over the elected projection delta
            assert {f"{t}/{PROJECTION_KEY}" for t in TASKS} <= set(bundle.tensors("masks"))
        else:  # per-task low-rank factors over the base's projection
            assert engine.kind == "lowrank" and f"{PROJECTION_KEY}.B" in bundle.tensors("factors"), method
        for t, task in enumerate(TASKS):
            probs = _served(engine, clip.x, t)
            assert probs.shape == clip.want[task].shape and torch.isfinite(probs).all(), method
            torch.testing.assert_close(probs.sum(-1), torch.ones(len(clip.x)))
            if method in EXACT:
                assert _diff(probs, clip.want[task]) < TOL, (method, task)


def test_gated_experts_carry_each_tasks_projection(hf_zoo):
    """The gated methods gate the projection (an expert per task, like norms and embeddings, right before
    the head); with every block gated, the given task's expert is its model exactly, in both strategies."""
    zoo = hf_zoo.zoo
    finetuned = [zoo.backbone(t) for t in TASKS]
    heads = [zoo.head(t) for t in TASKS]
    arch = zoo.metas["birds"].architecture
    assert PROJECTION_KEY in gating_plan(finetuned, 0).gated_keys
    plan = gating_plan(finetuned, 2)  # every attention and MLP block of the depth-2 towers
    experts = expert_stacks(finetuned, plan.gated_keys)
    assert set(experts) == set(finetuned[0])
    model = GatedViT(arch, {}, experts, heads)
    proj = model.vit.fc_norm.proj
    assert isinstance(proj, GatedLinear) and torch.equal(
        proj.weight, torch.stack([f[PROJECTION_KEY] for f in finetuned])
    )
    for t, task in enumerate(TASKS):
        p = F.one_hot(torch.full((len(hf_zoo.x),), t), len(TASKS)).float()
        for mixing in ("exact", "sparse"):
            out = model.classify(hf_zoo.x, p, mixing)  # type: ignore[arg-type]
            assert _diff(torch.stack(out.logits).softmax(-1), hf_zoo.want[task]) < TOL, (task, mixing)


def test_regmean_and_fisher_treat_the_projection_as_a_linear(hf_zoo):
    """RegMean hooks the projection (the Gram of the pooled, normed tokens it reads); Fisher weighs it."""
    zoo = hf_zoo.zoo
    model = zoo.build_model("birds")
    grams = collect_grams(model, hf_zoo.x)
    with torch.no_grad():
        pooled = model.forward_features(hf_zoo.x)[:, 0].double()
    torch.testing.assert_close(grams[PROJECTION_KEY], pooled.T @ pooled / len(pooled))
    merged = regmean(zoo.backbone("base"), [zoo.backbone("birds")], [grams])
    torch.testing.assert_close(merged[PROJECTION_KEY], hf_zoo.projections["birds"])  # one model: itself
    fisher = estimate_fisher(model, hf_zoo.x[:2])
    assert fisher[PROJECTION_KEY].shape == (16, 32) and float(fisher[PROJECTION_KEY].sum()) > 0


@pytest.mark.parametrize("method", sorted(DIFFERENT_INIT.methods))
def test_different_init_merges_refuse_clip_towers_by_name(hf_zoo, method):
    """Unit matching, FS-Merge and distillation map features onto the residual stream: a projection is named."""
    ctx = merge_context(hf_zoo.zoo, list(TASKS))
    with pytest.raises(ValueError, match=f"{method} merges plain timm ViTs; .*'{PROJECTION_KEY}'.*emr, tsv_c"):
        REGISTRY.run_merge(method, ctx)
