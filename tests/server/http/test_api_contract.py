"""The OpenAPI document is the contract: ``schemathesis run --checks all`` against a live `vitmerge serve`.

Every operation of ``/openapi.json`` (which describes the served bundle: its tasks, versions and input
tensors) gets schema-generated requests in every phase (examples, coverage, fuzzing, stateful), positive and
negative, from a fixed seed: each response must be documented (status, media type, body schema, headers),
never a 5xx; schema-valid requests must be accepted and schema-violating ones refused. Once without
credentials (admin routes: 401), once with the admin token on the admin routes. The image content the
document names (format ``base64-image``, image media types) is drawn by tests/schemathesis_hooks.py; what
schemathesis' defaults cannot know (413 is a rejection too) is in tests/schemathesis.toml. The one check
left out anywhere: "valid data is accepted" on ``POST /v1/merge`` with the token (why: below).
"""

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from server_helpers import REPO, LiveServer

#: generated requests per operation and phase: every operation is reached (asserted below), in ~20 s here
EXAMPLES = 25
SEED = 1
ADMIN = r"^/(v1/merge|v2/repository)"


@pytest.fixture(scope="module")
def server(server_store_template, test_zoo_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("contract") / "store"
    shutil.copytree(server_store_template, store)
    # two images per request at most: the /v2 infer body spells out every batch size (JSON Schema cannot tie a
    # tensor's shape to its data), so a small limit keeps the document and its generated requests small
    live = LiveServer(store, test_zoo_dir, ["--watch-interval", "0"], env={"VITMERGE_MAX_IMAGES": "2"})
    try:
        live.wait_ready()
        yield live
    finally:
        live.terminate()


def _run(url: str, report: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, int]]:
    """``schemathesis run`` (the CLI, as a person would run it); returns it and the test cases per operation."""
    cli = Path(sys.executable).parent / "schemathesis"
    cmd = [str(cli), "--config-file", str(REPO / "tests" / "schemathesis.toml"), "--no-color", "run"]
    cmd += [f"{url}/openapi.json", "--checks", "all", "--seed", str(SEED), "--max-examples", str(EXAMPLES)]
    cmd += ["--workers", "1", "--generation-database", "none", "--report", "junit", "--report-junit-path", str(report)]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
    }
    done = subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    cases = {case.get("name", ""): 1 for case in ET.parse(report).iter("testcase")}
    return done, cases


def _operations(url: str) -> set[str]:
    doc = httpx.get(f"{url}/openapi.json").json()
    return {f"{method.upper()} {path}" for path, ops in doc["paths"].items() for method in ops}


def test_every_operation_keeps_its_documented_contract(server, tmp_path):
    operations = _operations(server.url)
    assert len(operations) == 20, sorted(operations)
    # the pages for people (playground, Swagger UI, ReDoc) are HTML outside the API's contract: served, not listed
    for page in ("/", "/docs", "/redoc"):
        r = httpx.get(f"{server.url}{page}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), page
        assert not any(op.endswith(f" {page}") for op in operations), page
    done, tested = _run(server.url, tmp_path / "open.xml")
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]
    assert operations <= set(tested), sorted(operations - set(tested))  # every operation was reached
    summary = re.search(r"(\d+) generated", done.stdout)
    assert summary and int(summary.group(1)) >= 20 * EXAMPLES, done.stdout[-2000:]


def test_admin_operations_keep_their_contract_with_the_token(server, tmp_path):
    admin = {op for op in _operations(server.url) if re.match(ADMIN, op.split(" ", 1)[1])}
    assert len(admin) == 5, admin
    token = ["-H", "Authorization: Bearer s3cret"]
    admin_run = [*token, "--include-path-regex", ADMIN, "--exclude-path", "/v1/merge"]
    done, tested = _run(server.url, tmp_path / "admin.xml", *admin_run)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]
    assert set(tested) - {"Stateful tests"} == admin - {"POST /v1/merge"}, sorted(tested)
    # POST /v1/merge with the token, every check but one: a schema-valid merge request starts a real merge (minutes
    # of CPU in a child process, then a hot swap under the rest of the run), and which method, params and tasks a
    # zoo supports is checked at submit time against the method registry and the zoo (422 naming the problem),
    # which the body's JSON schema does not enumerate
    merge = [*token, "--include-name", "POST /v1/merge", "--exclude-checks", "positive_data_acceptance"]
    done, tested = _run(server.url, tmp_path / "merge.xml", *merge)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]
    assert set(tested) - {"Stateful tests"} == {"POST /v1/merge"}, tested
    assert httpx.get(f"{server.url}/readyz").json()["model_version"] == "v1"  # and nothing swapped the model
