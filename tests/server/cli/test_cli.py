import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from model_store.architecture import build_model
from model_store.bundle import BundleStore
from model_store.schema import Architecture
from model_store.settings import StoreLayout, resolve_store
from server.cli import main

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "in_chans": 3}


def test_zoo_build_reports_what_it_built(test_zoo_dir, capsys):
    store = test_zoo_dir.parent.parent
    assert main(["zoo", "build", "--preset", "test", "--store", str(store), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "cached" in out and "task mnist" in out and "test acc" in out
    assert main(["zoo", "list", "--store", str(store)]) == 0
    assert "test: base=base tasks=mnist,animals,solar,digits" in capsys.readouterr().out
    assert main(["zoo", "show", "test", "--store", str(store)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["models"]["digits"]["class_names"] == [str(i) for i in range(10)]


def test_unknown_preset_is_a_clear_error(tmp_path, capsys):
    assert main(["zoo", "build", "--preset", "huge", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown zoo preset 'huge'; known presets: " in err and "dinov2-s14" in err and "tiny" in err


def test_import_timm_via_cli(tmp_path, capsys):
    model = build_model(Architecture(timm_name="vit_tiny_patch16_224", kwargs=TINY), 3)
    ckpt = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    args = [
        "import",
        "timm",
        "--store",
        str(tmp_path / "s"),
        "--zoo",
        "mine",
        "--name",
        "flowers",
        "--checkpoint",
        str(ckpt),
        "--model-name",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        json.dumps(TINY),
        "--classes",
        "rose,tulip,daisy",
    ]
    assert main(args) == 0
    assert (tmp_path / "s" / "zoos" / "mine" / "models" / "flowers" / "meta.json").exists()
    bad = args[:-1] + ["rose,tulip"]  # wrong number of classes -> head does not fit
    assert main(bad) == 2
    assert "does not fit" in capsys.readouterr().err


def test_store_commands(tmp_path, capsys):
    layout = StoreLayout(tmp_path)
    store = BundleStore(layout)
    draft = store.draft()
    draft.add_tensors("unified", {"w": torch.ones(2)})
    store.publish(draft, "avg", tasks=["a"])
    assert main(["store", "list", "--store", str(tmp_path)]) == 0
    assert "* v1  avg" in capsys.readouterr().out
    assert main(["store", "verify", "--store", str(tmp_path)]) == 0
    (layout.bundles / "v1" / "unified.safetensors").write_bytes(b"garbage")
    assert main(["store", "verify", "--store", str(tmp_path)]) == 2
    assert "bundle v1" in capsys.readouterr().err


def test_store_location_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VITMERGE_STORE", str(tmp_path / "envstore"))
    assert resolve_store().root == (tmp_path / "envstore").resolve()
    assert resolve_store(tmp_path / "flag").root == (tmp_path / "flag").resolve()
    monkeypatch.delenv("VITMERGE_STORE")
    assert resolve_store().root.name == "store"


def test_gated_mixing_from_flags_and_environment(monkeypatch):
    """``--mixing`` / ``VITMERGE_MIXING``; the former names ``--strategy`` / ``VITMERGE_STRATEGY`` still work."""
    from server.cli import build_parser, serve_settings

    parser = build_parser()
    monkeypatch.delenv("VITMERGE_MIXING", raising=False)
    monkeypatch.delenv("VITMERGE_STRATEGY", raising=False)
    args = parser.parse_args(["serve"])
    assert serve_settings(args).mixing == "sparse"
    assert serve_settings(parser.parse_args(["serve", "--mixing", "exact"])).mixing == "exact"
    assert serve_settings(parser.parse_args(["serve", "--strategy", "exact"])).mixing == "exact"
    monkeypatch.setenv("VITMERGE_STRATEGY", "exact")
    assert serve_settings(args).mixing == "exact"
    monkeypatch.delenv("VITMERGE_STRATEGY")
    monkeypatch.setenv("VITMERGE_MIXING", "exact")
    assert serve_settings(args).mixing == "exact"
    assert serve_settings(parser.parse_args(["serve", "--mixing", "sparse"])).mixing == "sparse"


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "zoo" in out.stdout and "import" in out.stdout


def test_merge_and_eval_via_cli(test_zoo_dir, tmp_path, capsys):
    store = tmp_path / "s"
    assert (
        main(
            [
                "merge",
                "--store",
                str(store),
                "--zoo",
                str(test_zoo_dir),
                "--method",
                "task_arithmetic",
                "--param",
                "lam=0.5",
                "--quiet",
            ]
        )
        == 0
    )
    assert "published bundle v1 (task_arithmetic" in capsys.readouterr().out
    manifest = json.loads((store / "bundles" / "v1" / "manifest.json").read_text())
    assert manifest["params"] == {"lam": 0.5} and manifest["zoo"]["hashes"]
    assert main(["eval", "--store", str(store), "--limit", "50", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| individual |" in table and "| task_arithmetic (v1) |" in table


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--method", "magic"],
            "valid methods: avg, dare_ta, dare_ties, distill, emr, emr_routed, fisher, fs_merge, fs_merge_seq, "
            "gating_avg, gating_regmean, lora, lora_routed, mudsc_align, mudsc_zip, regmean, task_arithmetic, ties, "
            "tsv_c, tsv_m, tsv_routed",
        ),
        (["--method", "ties", "--param", "k=1.5"], "Valid parameters: k (default 0.2), lam (default 1.0)"),
        (["--method", "ties", "--param", "gamma=1"], "gamma"),
        (["--method", "avg", "--param", "oops"], "--param expects key=value"),
        (["--method", "avg", "--tasks", "mnist,cifar"], "unknown task"),
    ],
)
def test_bad_merge_requests_publish_nothing(test_zoo_dir, tmp_path, capsys, extra, message):
    store = tmp_path / "s"
    assert main(["merge", "--store", str(store), "--zoo", str(test_zoo_dir), "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (store / "CURRENT").exists()
    assert not any((store / "bundles").glob("v*")) if (store / "bundles").exists() else True


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("avg", "task_arithmetic", "ties", "dare_ta", "dare_ties", "regmean", "fisher", "emr"):
        assert name in out


def test_routed_eval_via_cli(test_zoo_dir, tmp_path, capsys):
    store = tmp_path / "s"
    args = [
        "merge",
        "--store",
        str(store),
        "--zoo",
        str(test_zoo_dir),
        "--method",
        "emr_routed",
        "--quiet",
        "--param",
        "gate_arch=mobilenetv2_100",
        "--param",
        "gate_size=32",
        "--param",
        "gate_epochs=2",
        "--param",
        "gate_max_images=200",
        "--param",
        "gate_test_images=40",
    ]
    assert main(args) == 0
    capsys.readouterr()
    manifest = json.loads((store / "bundles" / "v1" / "manifest.json").read_text())
    assert set(manifest["extra"]["gate_test_accuracy"]) == {"mnist", "animals", "solar", "digits"}
    assert main(["eval", "--store", str(store), "--routed", "--limit", "40", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| gate (task id) |" in out and "emr_routed routed (v1)" in out
    assert main(["merge", "--store", str(store), "--zoo", str(test_zoo_dir), "--method", "avg", "--quiet"]) == 0
    assert main(["eval", "--store", str(store), "--routed"]) == 2
    assert "has no router" in capsys.readouterr().err
