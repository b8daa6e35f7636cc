"""Deployment artefacts agree with the server: Dockerfile, compose, nginx, Kubernetes, the smoke plan.

The images are built and run by `make smoke` (deploy/smoke.sh: podman, ~20 min, not part of this
suite); what is checked here, offline: hadolint on every Dockerfile, YAML parsing and cross-checks
of every manifest against the server's settings and routes, the Kubernetes API schemas, and the
smoke plan's own wiring (shell syntax, podman settings within this machine's limits).
"""

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from server_helpers import require

from server.http.app import create_app
from server.http.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.34.0"  # the API schemas the manifests are checked against (kubernetes-validate ships them)
SETTINGS = {f"VITMERGE_{name.upper()}" for name in ServerSettings.model_fields}


def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _routes() -> set[str]:
    """The paths the app serves, from its OpenAPI document (FastAPI includes routers lazily)."""
    return set(create_app(ServerSettings(watch_interval_s=0)).openapi()["paths"])


def test_dockerfile_matches_the_server():
    instructions = _dockerfile()
    entry = [json.loads(rest) for op, rest in instructions if op == "ENTRYPOINT"]
    assert entry == [["vitmerge", "serve"]]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vitmerge"] == "server.cli:main"
    env = " ".join(rest for op, rest in instructions if op == "ENV")
    names = set(re.findall(r"(VITMERGE_[A-Z_]+)=", env))
    assert names and names <= SETTINGS, names - SETTINGS
    port = re.search(r"VITMERGE_PORT=(\d+)", env).group(1)
    assert [rest for op, rest in instructions if op == "EXPOSE"] == [port]
    health = " ".join(rest for op, rest in instructions if op == "HEALTHCHECK")
    assert "/healthz" in health and "/healthz" in _routes()
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert len([1 for op, _ in instructions if op == "FROM"]) >= 2  # multi-stage
    assert any(op == "VOLUME" and "/store" in rest for op, rest in instructions)
    assert (REPO / ".dockerignore").exists() and ".venv" in (REPO / ".dockerignore").read_text()


DOCKERFILES = ["Dockerfile", "deploy/local-images/nginx.Dockerfile", "deploy/local-images/prometheus.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile):
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [binary, "--failure-threshold", "warning", "--ignore", "DL3008", str(REPO / dockerfile)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_without_a_registry_and_keeps_build_secrets_out_of_the_image():
    """Base image and torch index are build args (defaults: the official slim image, CPU wheels);
    pip's configuration and CA bundle arrive as build secrets only (never COPY-ed, never in ENV)."""
    instructions = _dockerfile()
    args = dict(rest.partition("=")[::2] for op, rest in instructions if op == "ARG" and "=" in rest)
    assert args["BASE_IMAGE"] == "python:${PYTHON_VERSION}-slim-bookworm" and args["PYTHON_VERSION"] == "3.11"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    froms = [rest.split()[0] for op, rest in instructions if op == "FROM"]
    assert froms == ["${BASE_IMAGE}", "${BASE_IMAGE}"]  # the venv's interpreter path is the same in both stages
    runs = " ".join(rest for op, rest in instructions if op == "RUN")
    assert "python3 -m venv" in runs  # Debian's python has no `python`
    assert "--mount=type=secret,id=pipconf" in runs and "--mount=type=secret,id=ca" in runs
    assert '${TORCH_INDEX:+--extra-index-url "${TORCH_INDEX}"}' in runs  # empty: not used
    for op, rest in instructions:
        if op in ("COPY", "ADD", "ENV"):
            assert "pip.conf" not in rest and "secrets" not in rest and "PIP_CERT" not in rest, (op, rest)
    assert "--gid 10001" in runs and "--uid 10001" in runs  # the Deployment's runAsUser / runAsGroup


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR-default}`` / ``${VAR}``."""

    def one(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}", one, value)


def test_compose_images_default_to_the_official_ones_and_can_be_overridden():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    images = {name: svc["image"] for name, svc in services.items()}
    assert {n: _interpolate(i, {}) for n, i in images.items()} == {
        "vitmerge-1": "vitmerge:latest",
        "vitmerge-2": "vitmerge:latest",
        "lb": "nginx:1.27-alpine",
        "prometheus": "prom/prometheus:v3.1.0",
    }
    local = {"VITMERGE_IMAGE": "localhost/v", "NGINX_IMAGE": "localhost/n", "PROMETHEUS_IMAGE": "localhost/p"}
    assert {_interpolate(i, local) for i in images.values()} == set(local.values())
    build_args = services["vitmerge-1"]["build"]["args"]
    assert _interpolate(build_args["BASE_IMAGE"], {}) == "python:3.11-slim-bookworm"
    assert _interpolate(build_args["TORCH_INDEX"], {}) == "https://download.pytorch.org/whl/cpu"
    assert _interpolate(build_args["TORCH_INDEX"], {"TORCH_INDEX": ""}) == ""  # set empty: pip's own indexes


def test_the_smoke_plan_is_wired_and_its_podman_settings_fit_this_machine():
    smoke = DEPLOY / "smoke.sh"
    text = smoke.read_text()
    assert "set -euo pipefail" in text and 'echo "$passed passed, $failed failed"' in text
    subprocess.run(["bash", "-n", str(smoke)], check=True)
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^smoke:.*\n\tbash deploy/smoke.sh$", makefile, re.M)
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "smoke" not in test_recipe  # ~9 min: never part of `make test`
    assert '"deploy/local-images/$name.Dockerfile"' in text  # the images it builds where no registry answers
    assert all((REPO / d).exists() for d in DOCKERFILES)
    conf = tomllib.loads((DEPLOY / "smoke-containers.conf").read_text())
    assert conf["engine"]["runtime"] == "runc"  # crun refuses this machine's hybrid cgroup layout
    limits = dict(item.split("=") for item in conf["containers"]["default_ulimits"])
    for name, rlimit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft, hard = (int(v) for v in limits[name].split(":"))
        machine_soft, machine_hard = resource.getrlimit(rlimit)
        assert soft <= hard and (machine_hard == resource.RLIM_INFINITY or hard <= machine_hard), name
        if os.geteuid() != 0:  # root may raise its soft limit up to the hard one
            assert machine_soft == resource.RLIM_INFINITY or soft <= machine_soft, name
    client = subprocess.run(
        [sys.executable, str(DEPLOY / "smoke_client.py"), "--help"], capture_output=True, text=True, check=True
    )
    for cmd in ("wait-ready", "classify", "compare", "merge", "converge", "load"):
        assert cmd in client.stdout


def test_compose_and_nginx_agree_with_the_server():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    replicas = [n for n in services if n.startswith("vitmerge-")]
    assert len(replicas) >= 2
    for name in replicas:
        svc = services[name]
        assert "store:/store" in svc["volumes"] and svc["env_file"] == ["admin.env"]
        assert set(svc["environment"]) <= SETTINGS
        assert svc["build"]["context"] == ".." and svc["build"]["dockerfile"] == "Dockerfile"
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in services["lb"]["volumes"]
    assert "store" in compose["volumes"]
    env_example = (DEPLOY / "admin.env.example").read_text()
    assert "VITMERGE_ADMIN_TOKEN=" in env_example
    nginx = (DEPLOY / "nginx.conf").read_text()
    upstreams = re.findall(r"server\s+([\w.-]+):(\d+)", nginx)
    assert sorted(h for h, _ in upstreams) == sorted(replicas)
    assert {int(p) for _, p in upstreams} == {ServerSettings().port}
    size = re.search(r"client_max_body_size\s+(\d+)m;", nginx)
    assert int(size.group(1)) * 2**20 == ServerSettings().max_body_bytes
    for svc in replicas:  # compose raises the server's limit to nginx's, not beyond
        assert int(services[svc]["environment"]["VITMERGE_MAX_BODY_BYTES"]) == ServerSettings().max_body_bytes
    blocks = dict(re.findall(r"location ~ \^/\(v1/\)\?(\w+)[^{]*\{([^}]*)\}", nginx))
    assert "non_idempotent" in blocks["classify"]  # classify is retried on another replica
    # a merge POST that reached a replica is never retried; a job's status GET follows 404s to the replica holding it
    assert "non_idempotent" not in blocks["merge"] and "http_404" in blocks["merge"]
    # nginx drops idle upstream connections before the server closes them (else: 502s while a replica is down)
    idle = re.search(r"upstream vitmerge \{[^}]*keepalive_timeout\s+(\d+)s;", nginx)
    assert idle is not None and int(idle.group(1)) < ServerSettings().keep_alive_s
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(t.split(":")[0] for t in targets) == sorted(replicas)
    assert prom["scrape_configs"][0]["metrics_path"] == "/metrics" and "/metrics" in _routes()


def _k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def test_kubernetes_manifests_validate():
    docs = _k8s()
    assert {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "ConfigMap",
        "Secret",
        "HorizontalPodAutoscaler",
        "Kustomization",
    } <= set(docs)
    for kind, doc in docs.items():
        assert doc.get("apiVersion") and (kind == "Kustomization" or doc["metadata"]["name"])
    dep = docs["Deployment"]["spec"]
    pod = dep["template"]["spec"]
    assert dep["selector"]["matchLabels"] == dep["template"]["metadata"]["labels"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (c,) = pod["containers"]
    routes = _routes()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in routes
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and "/healthz" in routes
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # room for a first merge
    assert c["ports"][0]["containerPort"] == ServerSettings().port
    assert {"requests", "limits"} <= set(c["resources"])
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    env_names = (
        {e["name"] for e in c.get("env", [])} | set(docs["ConfigMap"]["data"]) | set(docs["Secret"]["stringData"])
    )
    assert env_names <= SETTINGS, env_names - SETTINGS
    assert {"configMapRef": {"name": docs["ConfigMap"]["metadata"]["name"]}} in c["envFrom"]
    assert {"secretRef": {"name": docs["Secret"]["metadata"]["name"]}} in c["envFrom"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["store"] == docs["ConfigMap"]["data"]["VITMERGE_STORE"]
    claim = next(v for v in pod["volumes"] if v["name"] == "store")["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert "ReadWriteMany" in docs["PersistentVolumeClaim"]["spec"]["accessModes"]
    svc = docs["Service"]["spec"]
    assert svc["selector"] == dep["selector"]["matchLabels"] and svc["ports"][0]["targetPort"] == c["ports"][0]["name"]
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"] and hpa["minReplicas"] >= 2
    listed = set(docs["Kustomization"]["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


def test_every_manifest_validates_against_the_kubernetes_api_schemas():
    """Each resource of the kustomization against the OpenAPI schemas of a current Kubernetes (offline, strict)."""
    kv = require("kubernetes_validate", "pip install -e '.[test]'")
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    kinds = set()
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
            if doc:
                kv.validate(doc, K8S_VERSION, strict=True)  # raises on an unknown field or a wrong type
                kinds.add(doc["kind"])
    assert {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "Secret", "HorizontalPodAutoscaler"} == kinds
    broken = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)
