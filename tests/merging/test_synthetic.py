"""Synthetic bundles (the serving benchmarks' input): every kind publishes a valid bundle the Engine serves, and a
synthetic backbone router routes the images it was fitted to (what ``benchmarks/lowrank_serve.py`` asserts)."""

from __future__ import annotations

import torch

from merging.synthetic import publish_synthetic, synthetic_gate, synthetic_router, synthetic_zoo
from model_store.bundle import BundleStore
from model_store.schema import Architecture, BundleRouterSpec
from model_store.settings import StoreLayout
from server.runtime.engine import Engine

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "in_chans": 3}


def test_synthetic_bundles_of_every_kind_and_router_publish_and_serve(tmp_path):
    arch = Architecture(timm_name="vit_tiny_patch16_224", kwargs=TINY)
    zoo = synthetic_zoo(arch, 3, seed=0)
    gate, _ = synthetic_gate(3, 32, seed=0, pool=64)
    store = BundleStore(StoreLayout(tmp_path), keep=10)
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    owners = [i % 3 for i in range(12)]
    head = synthetic_router(arch, zoo[0], 1, 0, x, owners, seed=0)
    given = {}
    for name, f, router in [
        ("emr", None, None),
        ("lowrank", 0.25, None),
        ("rerun", 0.25, BundleRouterSpec(k=1, variant="rerun", hidden=0, theta0_file="backbone")),
        ("shared", 0.25, BundleRouterSpec(k=1, variant="shared_prefix", hidden=0, theta0_file="backbone")),
    ]:
        version = publish_synthetic(store, name, arch, 16, zoo, gate, f, gate_size=32, router=router, router_head=head)
        engine = Engine(store.load(version))
        assert engine.kind == ("emr" if f is None else "lowrank")
        assert engine.router_kind == ("gate" if router is None else "backbone")
        given[name] = torch.stack([o.probabilities for o in engine.predict(x, owners)])
        if router is not None:
            assert [o.task for o in engine.predict(x, [None] * len(x))] == owners
    torch.testing.assert_close(given["rerun"], given["lowrank"])  # rerun keeps every delta
    assert not torch.allclose(given["shared"], given["lowrank"])  # shared_prefix drops block 1's
