"""Does the suite catch these bugs? Apply one mutation at a time, run the test that must catch it, restore.

Prints ``red`` (the test failed: good) or ``GREEN`` (the bug went unnoticed) per mutation.

    .venv/bin/python scripts/mutation_check.py            # all (~7 min here)
    .venv/bin/python scripts/mutation_check.py M1 M4      # some
"""

import pathlib
import subprocess
import sys

M = [
    (
        "M1 prune deletes CURRENT",
        "model_store/bundle.py",
        "                if version != current:\n",
        "                if True:\n",
        "tests/model_store/test_bundle.py::test_retention_keeps_last_k_and_never_the_current",
    ),
    (
        "M2 publish keeps a failed draft",
        "model_store/bundle.py",
        "        except BaseException:\n            draft.discard()\n            raise\n        self.prune()",
        "        except BaseException:\n            raise\n        self.prune()",
        "tests/model_store/test_bundle.py::test_failure_inside_publish_discards_the_draft_and_changes_nothing",
    ),
    (
        "M3 merge job keeps an unloadable version",
        "server/http/merge_process.py",
        "            store.remove(version)",
        "            pass",
        "tests/server/http/test_api.py::test_merge_job_swaps_atomically_and_failed_merge_changes_nothing",
    ),
    (
        "M5 routed path runs task 0's weights for every group",
        "server/runtime/strategies.py",
        "            y = self.task_module(t)(x[rows])",
        "            y = self.task_module(0)(x[rows])",
        "tests/server/runtime/test_routed.py::test_routed_emr_is_close_to_task_given_emr",
    ),
    (
        "M6 RegMean returns AvgMean",
        "merging/methods/shared_base_methods.py",
        "    return MergeResult(backbone=regmean(ctx.pretrained, ctx.finetuned, grams, p.alpha))",
        "    return MergeResult(backbone=weight_average(ctx.finetuned))",
        "tests/merging/test_pipeline.py::test_static_merges_keep_their_known_order_against_averaging",
    ),
    (
        "M8 DINOv2 conversion off by 0.1% in every tensor",
        "model_store/importers/dinov2_onnx.py",
        "        state[key] = value.float().contiguous()",
        "        state[key] = (value.float() * 1.001).contiguous()",
        "tests/model_store/test_importers.py::test_dinov2_import_matches_onnxruntime_on_a_real_image",
    ),
    (
        "M10 eval --limit scores the individual models on every image",
        "server/eval/accuracy.py",
        "        out[task] = accuracy(zoo.build_model(task), images.tensors(prep, limit), images.label_tensor(limit))",
        "        out[task] = accuracy(zoo.build_model(task), images.tensors(prep), images.label_tensor())",
        "tests/model_store/test_user_zoo.py::test_eval_compares_like_with_like_on_the_users_test_images",
    ),
    (
        "M12 draining answers model_not_loaded",
        "server/http/state.py",
        "        if self.batcher is not None and self.batcher.stopping:",
        "        if False:",
        "tests/server/http/test_resilience.py::test_requests_arriving_while_draining_get_503",
    ),
    (
        "M13 watcher forgets failed versions",
        "server/http/model_manager.py",
        "                    self._failed_versions.add(failed)",
        "                    pass",
        "tests/server/http/test_resilience.py::test_watcher_keeps_serving_when_current_moves_to_a_corrupt_version",
    ),
    (
        "M15 --port flag ignored",
        "server/cli/serve.py",
        '        "port": args.port,',
        '        "port": None,',
        "tests/server/http/test_resilience.py::test_flags_beat_environment_which_beats_defaults",
    ),
    (
        "M4 nginx does not retry POST on the other replica",
        "deploy/nginx.conf",
        "http_503 non_idempotent;",
        "http_503;",
        "tests/server/http/test_cluster.py",
    ),
    (
        "M7 test zoo's mnist model trained 1 epoch instead of 5",
        "model_store/zoo_build/presets.py",
        'TaskRecipe("mnist", TrainConfig(epochs=5, lr=1e-3, batch_size=64)),',
        'TaskRecipe("mnist", TrainConfig(epochs=1, lr=1e-3, batch_size=64)),',
        "tests/model_store/test_zoo.py::test_test_zoo_models_learnt_their_tasks",
    ),
    (
        "M9 accuracy bench ignores --limit",
        "server/eval/bench.py",
        "        xs.append(images.tensors(prep, limit))\n        raw.append(images)",
        "        xs.append(images.tensors(prep))\n        raw.append(images)",
        "tests/server/eval/test_bench_accuracy.py::test_table_has_every_row_and_column",
    ),
]
only = sys.argv[1:]
failed_to_catch = 0
for name, path, old, new, test in M:
    if only and name.split()[0] not in only:
        continue
    p = pathlib.Path(path)
    src = p.read_text()
    assert src.count(old) == 1, (name, src.count(old))
    p.write_text(src.replace(old, new))
    try:
        r = subprocess.run(
            [".venv/bin/python", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        p.write_text(src)
    last = [line for line in r.stdout.splitlines() if "passed" in line or "failed" in line or "error" in line][-1:]
    print(f"{'red  ' if r.returncode else 'GREEN'} {name}: {last}", flush=True)
    failed_to_catch += r.returncode == 0
sys.exit(1 if failed_to_catch else 0)
