"""Settings chosen without labels (SPEC section 9) on the `test` zoo: `--target-agreement` over a grid of (f, bits).

One real selection (tsv_routed, 4 candidates) is run once for the module with spies on the gate's training, on
TSV-C's SVDs and on every image read; the tests check what it chose, what it recorded and what it read.
"""

import time

import pytest
import torch

import merging.gating.router as router_module
import merging.methods.shared_base_methods as tsv_methods
from merging.methods.tsv import tsv_compress
from merging.pipeline import merge_context, select_and_publish
from merging.selection import CandidateRecord, SelectionError, choose, selection_grid
from model_store.bundle import BundleStore
from model_store.data.attach import calibration_set
from model_store.data.sources import Holdout, ImageSet
from model_store.schema import Preprocessing
from model_store.settings import StoreLayout
from server.cli import main
from server.runtime.selection import HeldOutAgreement

#: a gate that trains in ~2 s yet routes well enough for agreements to differ between candidates
#: (3 epochs at 32 px); its test accuracy is not measured (no test image is read anywhere here)
GATE = {"gate_epochs": 3, "gate_size": 32, "gate_max_images": 400, "gate_test_images": 0}
GRID = {"f": [0.07, 0.25], "bits": [32, 4]}
TARGET = 0.7


@pytest.fixture(scope="module")
def selected(test_zoo_report, tmp_path_factory):
    """One selection with spies: (store, outcome, selection, reads by role, gate trainings, TSV-C SVD runs)."""
    zoo = test_zoo_report.zoo
    store = BundleStore(StoreLayout(tmp_path_factory.mktemp("selection")), keep=10)
    reads: list[str] = []
    gates: list[list[torch.Tensor]] = []
    svds: list[float] = []
    real_chunks, real_pixels = ImageSet.chunks, ImageSet.pixels
    real_gate, real_tsv = router_module.train_gate, tsv_methods.tsv_compress

    def chunks(self, *args, **kwargs):
        reads.append(self.role)
        return real_chunks(self, *args, **kwargs)

    def pixels(self, i):
        reads.append(self.role)
        return real_pixels(self, i)

    def train_gate(images, *args, **kwargs):
        gates.append(list(images))
        return real_gate(images, *args, **kwargs)

    def tsv(pretrained, finetuned, f, conv=False):
        svds.append(f)
        return real_tsv(pretrained, finetuned, f, conv)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ImageSet, "chunks", chunks)
        mp.setattr(ImageSet, "pixels", pixels)
        mp.setattr(router_module, "train_gate", train_gate)
        mp.setattr(tsv_methods, "tsv_compress", tsv)
        outcome, selection = select_and_publish(zoo, store, "tsv_routed", GATE, TARGET, HeldOutAgreement(zoo), GRID)
    return store, outcome, selection, reads, gates, svds


def test_selection_publishes_the_smallest_candidate_that_meets_the_target_on_every_task(selected):
    store, outcome, selection, *_ = selected
    records = selection.candidates
    assert len(records) == 4 and {tuple(r.params.items()) for r in records} == {
        (("f", f), ("bits", b)) for f in GRID["f"] for b in GRID["bits"]
    }
    for r in records:  # the measure: routed top-1 agreement on every task's held-out calibration images
        routed = [a.top1_routed for a in r.agreement]
        assert all(a.split == "calibration_holdout" for a in r.agreement) and None not in routed
        assert r.min_agreement == min(routed) and r.meets_target == (min(routed) >= TARGET)  # type: ignore[type-var]
    meeting = [r for r in records if r.meets_target]
    chosen = min(meeting, key=lambda r: r.stored_bytes)
    assert selection.chosen == chosen.params and selection.measure == "routed"
    # the grid separates "smallest" from "best": a smaller candidate failed, a larger one met the target
    assert any(r.stored_bytes < chosen.stored_bytes and not r.meets_target for r in records)
    assert any(r.stored_bytes > chosen.stored_bytes and r.meets_target for r in records)
    bundle = store.load(outcome.version)
    m = bundle.manifest
    assert {k: m.params[k] for k in chosen.params} == chosen.params
    assert m.extra.stored_bytes is not None and m.extra.stored_bytes.total == chosen.stored_bytes
    assert m.extra.selection == selection and not m.extra.legacy
    assert m.extra.selection.grid == GRID and m.extra.selection.target_agreement == TARGET


def test_selection_fits_on_the_fit_part_only_and_records_the_split(test_zoo_report, selected):
    """The gate trained once, on the fit part of each task's calibration images (never the held-out part);
    TSV-C's SVDs ran once, at the grid's largest f; the manifest's data record says how each task was split
    and the held-out counts agree with the images every candidate was measured on."""
    store, outcome, selection, reads, gates, svds = selected
    zoo = test_zoo_report.zoo
    assert svds == [0.25] and len(gates) == 1
    half = router_module.GATE_MEAN_STD
    prep = Preprocessing(size=GATE["gate_size"], channels=3, mean=half, std=half)
    data = store.load(outcome.version).manifest.extra.data
    assert data is not None
    for i, task in enumerate(zoo.tasks):
        fit, held = Holdout().split(calibration_set(zoo, task))
        torch.testing.assert_close(gates[0][i], fit.tensors(prep, GATE["gate_max_images"]), atol=0, rtol=0)
        split = data[task].holdout
        assert split is not None and split.fit_images == len(fit) and split.held_out_images == len(held)
        assert selection.holdout["images"][task] == len(held)
        assert split.fraction == 0.2 and split.seed == 0 and split.held_out_sha256 == held.fingerprint()
        assert all(a.images == len(held) for r in selection.candidates for a in r.agreement if a.task == task)


def test_selection_never_reads_a_test_image(selected):
    *_, reads, _, _ = selected
    assert "calibration" in reads and "test" not in reads


def test_choose_follows_the_rule_at_every_threshold_and_refuses_naming_the_best(selected):
    records: list[CandidateRecord] = selected[2].candidates
    for target in sorted({r.min_agreement for r in records}):
        met = [r.model_copy(update={"meets_target": r.min_agreement >= target}) for r in records]
        assert (
            choose(met, target).params
            == min((r for r in met if r.min_agreement >= target), key=lambda r: r.stored_bytes).params
        )
    best = max(records, key=lambda r: r.min_agreement)
    none = [r.model_copy(update={"meets_target": False}) for r in records]
    with pytest.raises(
        SelectionError, match=f"the best reached {best.min_agreement:.4f} \\(task '{best.worst_task}'\\)"
    ):
        choose(none, 1.0)


def test_the_cli_refuses_clearly_when_no_candidate_meets_the_target_and_publishes_nothing(
    test_zoo_dir, selected, tmp_path, capsys
):
    """The grid's smallest candidate alone, at a target above what it reached: exit 2, the best agreement named."""
    worst = min(selected[2].candidates, key=lambda r: r.stored_bytes)
    assert worst.min_agreement < 0.99
    params = [x for k, v in GATE.items() for x in ("--param", f"{k}={v}")]
    grid = ["--grid", f"f={worst.params['f']}", "--grid", f"bits={worst.params['bits']}"]
    argv = ["merge", "--zoo", str(test_zoo_dir), "--store", str(tmp_path), "--method", "tsv_routed", *params]
    assert main([*argv, *grid, "--target-agreement", "0.99", "--agreement-images", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the best reached {worst.min_agreement:.4f}" in err and "lower the target" in err, err
    bundles = tmp_path / "bundles"
    assert not bundles.exists() or list(bundles.iterdir()) == []  # no version, no staging folder left
    assert main([*argv, "--grid", "f=0.1", "--agreement-images", "0", "--quiet"]) == 2  # a grid needs a target
    assert "--grid needs --target-agreement" in capsys.readouterr().err


def test_grids_are_checked_before_any_work():
    axes, candidates = selection_grid("tsv_routed", {}, {"f": [0.03, 0.1], "bits": [8]})
    assert axes == {"f": [0.03, 0.1], "bits": [8]} and [c["f"] for c in candidates] == [0.1, 0.03]  # largest f first
    axes, _ = selection_grid("lora_routed", {}, None)  # no f: bits only (lora keeps each layer's exact rank)
    assert axes == {"bits": [32, 8, 4]}
    for grid, message in (
        ({"k": [1]}, "grid axis 'k' is not a parameter of 'tsv_routed'"),
        ({"bits": [16]}, "grid candidate"),
        ({"f": []}, "has no values"),
        ({"f": [[0.1]]}, "values must be numbers"),
        ({"f": [i / 100 for i in range(1, 23)], "bits": [32, 8, 4]}, "66 candidates; at most 64"),
    ):
        with pytest.raises(SelectionError, match=message):
            selection_grid("tsv_routed", {}, grid)
    with pytest.raises(SelectionError, match="none of the parameters a grid sweeps"):
        selection_grid("emr_routed", {}, None)


def test_tsv_c_truncated_from_a_larger_f_is_tsv_c_at_that_f(test_zoo_report):
    zoo = test_zoo_report.zoo
    base, tasks = zoo.backbone(zoo.base), [zoo.backbone(t) for t in zoo.tasks]
    small, big = tsv_compress(base, tasks, 0.07, conv=True), tsv_compress(base, tasks, 0.25, conv=True).truncated(0.07)
    assert big.ranks == small.ranks and big.rank_fraction == 0.07
    for got, want in zip(big.factors, small.factors):
        for k, (b, a) in want.items():
            assert torch.equal(got[k][0], b) and torch.equal(got[k][1], a)


def test_holdout_split_is_seeded_disjoint_and_covers_every_image(test_zoo_report):
    fit, held = Holdout(0.2, 3).indices(262)
    assert len(held) == 52 and sorted(fit + held) == list(range(262)) and not set(fit) & set(held)
    assert (fit, held) == Holdout(0.2, 3).indices(262) and held != Holdout(0.2, 4).indices(262)[1]
    assert Holdout(0.2).indices(2) == ([0], [1]) or Holdout(0.2).indices(2) == ([1], [0])
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        Holdout(1.0)
    zoo = test_zoo_report.zoo
    ctx = merge_context(zoo, zoo.tasks, holdout=Holdout())
    images = calibration_set(zoo, "digits")
    got = ctx.calibration(zoo.tasks.index("digits"), None, None)  # type: ignore[misc]
    want_fit, want_held = Holdout().split(images)
    prep = zoo.metas["digits"].preprocessing
    torch.testing.assert_close(got, want_fit.tensors(prep), atol=0, rtol=0)
    assert len(got) + len(want_held) == len(images)


def test_the_admin_merge_api_chooses_settings_and_refuses_bad_grids(server_store, test_zoo_dir):
    """``POST /v1/merge`` with ``target_agreement`` (and a ``grid``): 422 at once for a grid axis the method lacks
    or a grid without a target; otherwise a job that publishes the chosen candidate with its selection record."""
    from server_helpers import AsgiHarness

    from server.http.settings import ServerSettings

    zoo = str(test_zoo_dir)
    settings = ServerSettings(store=server_store, zoo=zoo, admin_token="s3cret", watch_interval_s=0, agreement_images=0)
    h = AsgiHarness(settings)
    auth = {"authorization": "Bearer s3cret"}
    try:
        body = {"method": "tsv_routed", "params": GATE, "target_agreement": 0.3}
        for bad, message in (
            ({**body, "grid": {"k": [1, 2]}}, "grid axis 'k' is not a parameter of 'tsv_routed'"),
            ({**body, "target_agreement": None, "grid": {"f": [0.1]}}, "a grid needs target_agreement"),
            ({**body, "target_agreement": 1.5}, "less than or equal to 1"),
        ):
            r = h.request("POST", "/v1/merge", json=bad, headers=auth)
            assert r.status_code == 422 and message in r.json()["error"]["message"], r.text
        r = h.request("POST", "/v1/merge", json={**body, "grid": {"f": [0.25], "bits": [8, 4]}}, headers=auth)
        assert r.status_code == 202 and r.json()["target_agreement"] == 0.3, r.text
        deadline = time.monotonic() + 120
        job = r.json()
        while job["state"] not in ("succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.1)
            job = h.request("GET", f"/v1/merge/{job['id']}", headers=auth).json()
        assert job["state"] == "succeeded" and job["grid"] == {"f": [0.25], "bits": [8, 4]}, job
        manifest = BundleStore(StoreLayout(server_store)).load(job["version"]).manifest
        selection = manifest.extra.selection
        assert selection is not None
        assert selection.chosen == {"f": 0.25, "bits": 4} and len(selection.candidates) == 2  # the smaller one met 0.3
        assert manifest.params["bits"] == 4 and h.state.manager.version == job["version"]
    finally:
        h.close()
