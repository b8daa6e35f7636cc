"""deploy/kserve/inferenceservice.yaml, validated offline against KServe's and Kubernetes' own API schemas.

KServe's types come from its Python SDK (PyPI ``kserve``, installed without dependencies by the set-up:
its generated models list every field and type of the InferenceService API, read here with ``ast``,
nothing imported); the Kubernetes types inside (``V1Container``, ``V1Volume``, probes, security
contexts...) are checked strictly against the Kubernetes 1.34 JSON schemas ``kubernetes-validate`` ships.
Then the manifest is cross-checked against the server: port, probe paths, settings, Secret and PVC names.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import cache
from pathlib import Path

import pytest
import yaml
from server_helpers import require

from server.http.app import create_app
from server.http.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "kserve" / "inferenceservice.yaml"
K8S_VERSION = "1.34.0"
K8S_FILES = {"V1ObjectMeta": "objectmeta-meta-v1.json"}  # the exceptions to V1<Name> -> <name>-v1.json
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str}


def _kserve_models() -> Path:
    spec = importlib.util.find_spec("kserve")  # locates the SDK without importing it (its deps are not installed)
    if spec is None or spec.origin is None:
        pytest.fail("kserve SDK is missing; install it with: pip install --no-deps kserve==0.21.0 (or make setup)")
    return Path(spec.origin).parent / "models"


@cache
def _kserve_type(name: str) -> tuple[dict[str, str], dict[str, str]]:
    """(openapi_types, json key -> attribute) of a KServe SDK model class, e.g. ``V1beta1PredictorSpec``."""
    path = _kserve_models() / (re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower() + ".py")
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    found = {
        t.id: ast.literal_eval(node.value)
        for node in cls.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name) and t.id in ("openapi_types", "attribute_map")
    }
    return found["openapi_types"], {v: k for k, v in found["attribute_map"].items()}


@cache
def _k8s_validator(type_name: str):
    """A strict JSON-schema validator of a Kubernetes type (``V1Container`` -> container-v1.json)."""
    jsonschema = require("jsonschema", "pip install kubernetes-validate")
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{K8S_VERSION}-local-strict"
    filename = K8S_FILES.get(type_name, f"{type_name.removeprefix('V1').lower()}-v1.json")
    try:
        schema = schema_contents(f"{folder}/{filename}", K8S_VERSION)
    except FileNotFoundError:
        raise AssertionError(f"no Kubernetes schema for {type_name} ({filename})") from None
    defs = Resource.from_contents(schema_contents(f"{folder}/_definitions.json", K8S_VERSION))
    registry = defs @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def validate(value: object, type_name: str, where: str) -> list[str]:
    """Every problem of ``value`` against ``type_name`` (a KServe or Kubernetes type, ``list[...]``, ``dict(...)``)."""
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [p for i, v in enumerate(value) for p in validate(v, m.group(1), f"{where}[{i}]")]
    if m := re.fullmatch(r"dict\((\w+), (.+)\)", type_name):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        return [p for k, v in value.items() for p in validate(v, m.group(2), f"{where}.{k}")]
    if type_name in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{where}: expected {type_name}, got {value!r}"]
    if type_name.startswith(("V1alpha", "V1beta")):
        if not isinstance(value, dict):
            return [f"{where}: expected an object ({type_name})"]
        types, attrs = _kserve_type(type_name)
        problems = [f"{where}.{k}: unknown field of {type_name}" for k in value if k not in attrs]
        return problems + [
            p for k, v in value.items() if k in attrs for p in validate(v, types[attrs[k]], f"{where}.{k}")
        ]
    errors = sorted(_k8s_validator(type_name).iter_errors(value), key=str)
    return [f"{where}{''.join(f'.{p}' for p in e.absolute_path)}: {e.message}" for e in errors]


@pytest.fixture(scope="module")
def isvc() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def test_the_inference_service_fits_the_kserve_and_kubernetes_schemas(isvc):
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    body = {k: v for k, v in isvc.items() if k not in ("apiVersion", "kind")}
    assert validate(body, "V1beta1InferenceService", "isvc") == []
    assert isvc["spec"]["predictor"]["scaleMetric"] in ("cpu", "memory", "concurrency", "rps")


def test_the_validator_catches_mistakes(isvc):
    """Not vacuous: a misspelt KServe field, a misspelt container field and a wrong type are each found."""
    import copy

    bad = copy.deepcopy(isvc)
    predictor = bad["spec"]["predictor"]
    predictor["minReplica"] = predictor.pop("minReplicas")
    predictor["containers"][0]["readinesProbe"] = predictor["containers"][0].pop("readinessProbe")
    predictor["timeout"] = "60s"
    predictor["volumes"][0]["persistentVolumeClaim"] = {"claim": "x"}
    problems = "\n".join(validate({k: v for k, v in bad.items() if k != "kind"}, "V1beta1InferenceService", "isvc"))
    assert "apiVersion: unknown field" not in problems
    for needle in ("minReplica: unknown field", "readinesProbe", "timeout: expected int", "claimName"):
        assert needle in problems, problems


def test_the_inference_service_agrees_with_the_server(isvc):
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    env = {e["name"]: e for e in container["env"]}
    settings = {f"VITMERGE_{n.upper()}" for n in ServerSettings.model_fields}
    assert set(env) <= settings, set(env) - settings
    port = int(env["VITMERGE_PORT"]["value"])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert env["VITMERGE_HOST"]["value"] == "0.0.0.0"
    assert env["VITMERGE_MODEL_NAME"]["value"] == isvc["metadata"]["name"]  # /v2/models/<isvc name>/infer
    paths = set(create_app(ServerSettings(watch_interval_s=0)).openapi()["paths"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"].startswith("/v2/health/") and get["path"] in paths and get["port"] == port
    k8s = REPO / "deploy" / "k8s"
    secret = yaml.safe_load((k8s / "secret.yaml").read_text())
    ref = env["VITMERGE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    pvc = yaml.safe_load((k8s / "pvc.yaml").read_text())
    claims = [v["persistentVolumeClaim"]["claimName"] for v in predictor["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]] and "ReadWriteMany" in pvc["spec"]["accessModes"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["VITMERGE_STORE"]["value"] in mounts and "/tmp" in mounts  # read-only root: the store and /tmp
    assert predictor["securityContext"]["runAsUser"] == 10001  # the image's user (Dockerfile USER)
