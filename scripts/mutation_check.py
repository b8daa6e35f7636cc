"""Does the suite catch these bugs? Apply one mutation at a time, run the tests that must catch it, restore.

Prints ``red`` (a test failed: good), ``GREEN`` (the bug went unnoticed) or ``ERROR`` (pytest could not run the
tests: no verdict) per mutation; exits 1 unless every mutation was caught. Each mutation runs only its own
tests (a file, or ``file::test``), with the repository first on ``PYTHONPATH`` (so that servers and merge
processes the tests start run the mutated code too).

    .venv/bin/python scripts/mutation_check.py            # all (~12.5 min here)
    .venv/bin/python scripts/mutation_check.py M1 M16     # some
"""

import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: (name, file, code, its mutation, the tests that must fail: one node id, or several separated by spaces)
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
        "        except BaseException:\n            draft.discard()\n            raise\n",
        "        except BaseException:\n            raise\n",
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
        "    return MergeResult(backbone=regmean(ctx.pretrained, ctx.finetuned, task_grams(ctx, p.max_images), p.alpha"
        "))",
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
        "    pool = TaskPool.of_bundle(models, limit)\n    return pool.reference_accuracy",
        "    pool = TaskPool.of_bundle(models)\n    return pool.reference_accuracy",
        "tests/model_store/test_user_zoo.py::test_eval_compares_like_with_like_on_the_users_test_images",
    ),
    (
        "M12 draining answers model_not_loaded",
        "server/http/state.py",
        "        if self.batcher is not None and self.batcher.stopping:",
        "        if False:",
        "tests/server/http/test_resilience.py::test_stop_answers_every_queued_request_and_refuses_new_ones",
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
        'self.pool = TaskPool.of_zoo(zoo, zoo.tasks, cfg.limit, "the accuracy benchmark")',
        'self.pool = TaskPool.of_zoo(zoo, zoo.tasks, None, "the accuracy benchmark")',
        "tests/server/eval/test_bench_accuracy.py::test_table_has_every_row_and_column",
    ),
]
# -- issue 34: the promises of auth, a failed merge, drain, metrics, soft gating, retries and file modes
M += [
    (
        "M16 a merge job's parameters readable without the admin token",
        "server/http/routes/admin.py",
        'summary="a merge job\'s state (admin)",\n        dependencies=[Depends(admin)],',
        'summary="a merge job\'s state (admin)",',
        "tests/server/http/test_auth.py",
    ),
    (
        "M17 anyone switches the served version on every replica (/v2 load without auth)",
        "server/http/routes/v2.py",
        'parameters.version (default CURRENT) (admin)",\n        dependencies=[Depends(admin)],',
        'parameters.version (default CURRENT) (admin)",',
        "tests/server/http/test_auth.py",
    ),
    (
        "M18 /v2 infer without the API key",
        "server/http/routes/v2.py",
        "        require_api_key(request, settings)\n        engine = await pinned(name, version)",
        "        engine = await pinned(name, version)",
        "tests/server/http/test_auth.py",
    ),
    (
        "M19 publish prunes before the new version is loaded (a failed merge deletes a rollback target)",
        "model_store/bundle.py",
        "        if make_current:  # not CURRENT yet: prune nothing",
        "        if True:  # not CURRENT yet: prune nothing",
        "tests/model_store/test_bundle.py tests/server/http/test_merge_jobs.py",
    ),
    (
        "M20 the drain loop removed (stop cancels queued requests)",
        "server/http/batcher.py",
        "        while self.busy and time.monotonic() < deadline and self._task is not None and not self._task.done():"
        "\n            await asyncio.sleep(0.01)\n",
        "",
        "tests/server/http/test_resilience.py::test_stop_answers_every_queued_request_and_refuses_new_ones",
    ),
    (
        "M21 the drain ends while the last batch still runs",
        "server/http/batcher.py",
        "return self._pending > 0 or self._running > 0 or self._incoming > 0",
        "return self._pending > 0",
        "tests/server/http/test_resilience.py::test_stop_waits_for_the_batch_on_the_worker_with_nothing_queued",
    ),
    (
        "M22 queue wait not observed",
        "server/http/batcher.py",
        "            self.metrics.queue_wait.observe(result.queue_s)\n",
        "",
        "tests/server/http/test_api.py::test_metrics_count_every_request_image_and_batch",
    ),
    (
        "M23 hot swaps not counted",
        "server/http/model_manager.py",
        "            self.metrics.swaps.inc()",
        "            pass",
        "tests/server/http/test_merge_jobs.py",
    ),
    (
        "M24 soft gating mixes the experts by p^2 / sum p^2",
        "server/runtime/gated_vit.py",
        "        p = p.to(x.dtype)\n        if mixing",
        "        p = (p * p / (p * p).sum(1, keepdim=True)).to(x.dtype)\n        if mixing",
        "tests/server/runtime/test_soft_gating.py",
    ),
    (
        "M25 the watcher's retry guard removed (a failed CURRENT is reloaded every poll)",
        "server/http/model_manager.py",
        "if current is None or current == self.version or current in self._failed_versions:",
        "if current is None or current == self.version:",
        "tests/server/http/test_resilience.py::test_watcher_keeps_serving_when_current_moves_to_a_corrupt_version",
    ),
    (
        "M26 published files narrowed to owner and group (0640)",
        "model_store/files.py",
        "PUBLISHED_FILE_MODE = 0o644",
        "PUBLISHED_FILE_MODE = 0o640",
        "tests/model_store/test_file_modes.py",
    ),
    (
        "M27 CURRENT written with the writer's umask",
        "model_store/bundle.py",
        'atomic_write_text(self.layout.current, version + "\\n", mode=PUBLISHED_FILE_MODE)',
        'atomic_write_text(self.layout.current, version + "\\n")',
        "tests/model_store/test_file_modes.py",
    ),
]
only = sys.argv[1:]
failed_to_catch = 0
started = time.monotonic()
for name, path, old, new, test in M:
    if only and name.split()[0] not in only:
        continue
    p = ROOT / path
    src = p.read_text()
    assert src.count(old) == 1, (name, src.count(old))
    p.write_text(src.replace(old, new))
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *test.split()],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
        )
    finally:
        p.write_text(src)
    last = [line for line in r.stdout.splitlines() if "passed" in line or "failed" in line or "error" in line][-1:]
    # pytest exits 1 when a test failed; 2+ (collection error, interrupted, usage) is no verdict on the mutation
    verdict = {0: "GREEN", 1: "red  "}.get(r.returncode, "ERROR")
    print(f"{verdict} {name} ({time.monotonic() - t0:.0f} s): {last}", flush=True)
    failed_to_catch += r.returncode != 1
print(f"{'every mutation caught' if not failed_to_catch else f'{failed_to_catch} NOT caught'}", end=" ")
print(f"({time.monotonic() - started:.0f} s)")
sys.exit(1 if failed_to_catch else 0)
