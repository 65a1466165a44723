"""The KubeRay resources in infra/k8s/ against KubeRay's own CRD schemas and the operator's own checks.

The CRDs are vendored verbatim (gzip) in ``kuberay_crds/<version>/`` (see its README). Unknown fields
are rejected here, although an API server would prune them silently: a misspelt or misplaced field
would otherwise vanish on ``kubectl apply``. The schemas' CEL rules (``x-kubernetes-validations``)
concern only ``managedBy`` and ``deletionStrategy``, which these manifests do not use; the operator's
checks of ``ray-operator/controllers/ray/utils/validation.go`` that touch fields used here are
restated in ``operator_problems``.
"""

from __future__ import annotations

import copy
import functools
import gzip
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers import REPO_ROOT

CRDS = Path(__file__).parent / "kuberay_crds"
TARGET = "1.7.0"
"""The KubeRay release the manifests are written for (infra/README.md, step 2)."""
OLDEST = "1.5.1"
"""The oldest vendored release: what an older operator would refuse."""
PLURALS = {"RayJob": "rayjobs", "RayService": "rayservices", "RayCluster": "rayclusters"}
MANIFESTS = sorted((REPO_ROOT / "infra" / "k8s").glob("*.yaml"))


def strict(schema: Any) -> Any:
    """``schema`` with every object that lists its properties closed to others (``additionalProperties:
    false``), except where Kubernetes keeps unknown fields (``x-kubernetes-preserve-unknown-fields``)."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


@functools.cache
def crd_schema(version: str, kind: str) -> dict[str, Any]:
    """The strict ``openAPIV3Schema`` of ``kind``'s ``v1`` version in KubeRay ``version``."""
    text = gzip.decompress((CRDS / version / f"ray.io_{PLURALS[kind]}.yaml.gz").read_bytes())
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 1 MB in ~0.5 s
    assert crd["spec"]["names"]["kind"] == kind
    served = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(copy.deepcopy(served["schema"]["openAPIV3Schema"]))


def schema_errors(doc: dict[str, Any], version: str) -> list[str]:
    validator = jsonschema.Draft4Validator(crd_schema(version, doc["kind"]))
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


def pod_template_schema() -> dict[str, Any]:
    """Kubernetes' PodTemplateSpec as KubeRay's RayCluster CRD embeds it (``headGroupSpec.template``)."""
    return crd_schema(TARGET, "RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"]["properties"][
        "template"]


def documents(kinds: set[str]) -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text())
            if doc and doc["kind"] in kinds]


def ray_resources() -> list[tuple[str, dict[str, Any]]]:
    return documents(set(PLURALS))


def cluster_of(doc: dict[str, Any]) -> dict[str, Any]:
    return {"RayJob": lambda s: s["rayClusterSpec"], "RayService": lambda s: s["rayClusterConfig"],
            "RayCluster": lambda s: s}[doc["kind"]](doc["spec"])


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def operator_problems(doc: dict[str, Any]) -> list[str]:
    """What KubeRay 1.7.0's operator refuses in ``doc`` (``ValidateRayClusterSpec``, ``ValidateRayJobSpec``,
    ``ValidateRayServiceSpec`` and the metadata checks), for the fields these manifests use."""
    problems = []
    kind, meta, spec, cluster = doc["kind"], doc["metadata"], doc["spec"], cluster_of(doc)
    annotations = meta.get("annotations", {})
    max_name = 53 if kind == "RayCluster" else 47  # utils.MaxRayClusterNameLength, minus 6 for the others
    if len(meta["name"]) > max_name or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", meta["name"]):
        problems.append(f"metadata.name: a DNS-1035 label of at most {max_name} characters")
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    if not head:
        problems.append("headGroupSpec should have at least one container")
    for group in cluster.get("workerGroupSpecs", []):
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not group["template"]["spec"]["containers"]:
            problems.append(f"worker group {group['groupName']}: no container")
        if not cluster.get("enableInTreeAutoscaling") and (low is None or high is None):
            problems.append(f"worker group {group['groupName']} must set minReplicas and maxReplicas")
        if (low or 0) < 0 or (high or 0) < 0 or (low is not None and high is not None and low > high):
            problems.append(f"worker group {group['groupName']}: replicas bounds {low}..{high}")
    head_env = {e["name"] for e in head[0].get("env", [])} if head else set()
    params = cluster["headGroupSpec"].get("rayStartParams", {})
    if cluster.get("gcsFaultToleranceOptions") is not None:
        if annotations.get("ray.io/ft-enabled"):
            problems.append("ray.io/ft-enabled annotation and gcsFaultToleranceOptions are both set")
        if params.get("redis-password") or {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"} & head_env:
            problems.append("redis-password / REDIS_PASSWORD / RAY_REDIS_ADDRESS set beside gcsFaultToleranceOptions")
        if annotations.get("ray.io/external-storage-namespace"):
            problems.append("external-storage-namespace annotation beside gcsFaultToleranceOptions")
    elif "RAY_REDIS_ADDRESS" in head_env:
        problems.append("RAY_REDIS_ADDRESS set without gcsFaultToleranceOptions")
    if params.get("redis-username") or "REDIS_USERNAME" in head_env:
        problems.append("redis username outside gcsFaultToleranceOptions")
    if cluster.get("authOptions", {}).get("mode") == "token" and version_tuple(cluster.get("rayVersion", "0")) < (
            2, 52, 0):
        problems.append("authOptions.mode token needs rayVersion 2.52.0 or later")
    if kind == "RayJob":
        if spec.get("ttlSecondsAfterFinished", 0) < 0:
            problems.append("ttlSecondsAfterFinished must be non-negative")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if field in spec and spec[field] <= 0:
                problems.append(f"{field} must be a positive integer")
        if spec.get("backoffLimit", 0) < 0:
            problems.append("backoffLimit must be non-negative")
    if kind == "RayService":
        upgrade = spec.get("upgradeStrategy", {}).get("type")
        if upgrade is not None and upgrade not in ("NewCluster", "None", "NewClusterWithIncrementalUpgrade"):
            problems.append(f"upgradeStrategy.type {upgrade!r}")
        timeout = str(annotations.get("ray.io/initializing-timeout", "1"))
        if not re.fullmatch(r"[1-9]\d*|(\d+(\.\d+)?(ns|us|ms|s|m|h))+", timeout) or re.fullmatch(r"[0.]+\D+", timeout):
            problems.append(f"ray.io/initializing-timeout {timeout!r}: a Go duration or positive seconds")
    return problems


# --- the vendored schemas -----------------------------------------------------------------------


def test_vendored_crds_are_kuberays_v1_resources_at_the_named_versions():
    assert sorted(p.name for p in CRDS.iterdir() if p.is_dir()) == [OLDEST, TARGET]
    for version in (OLDEST, TARGET):
        for kind in PLURALS:
            schema = crd_schema(version, kind)
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"]), (version, kind)
    job = crd_schema(TARGET, "RayJob")["properties"]["spec"]["properties"]
    assert {"activeDeadlineSeconds", "preRunningDeadlineSeconds", "ttlSecondsAfterFinished"} <= set(job)
    assert "preRunningDeadlineSeconds" not in crd_schema(OLDEST, "RayJob")["properties"]["spec"]["properties"]
    readme = (CRDS / "README.md").read_text()
    assert f"v{TARGET}" in readme and f"v{OLDEST}" in readme


def test_strict_schemas_reject_unknown_fields_at_every_depth():
    _, job = next(item for item in ray_resources() if item[1]["kind"] == "RayJob")
    assert not schema_errors(job, TARGET)
    misspelt = {
        "spec": lambda d: d["spec"].update(activeDeadlineSecond=10),
        "worker group": lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplica=0),
        "container": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        .update(imagePullPolcy="Always"),
        "resources": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
            "resources"].update(request={}),
    }
    for where, break_it in misspelt.items():
        broken = copy.deepcopy(job)
        break_it(broken)
        assert schema_errors(broken, TARGET), f"an unknown field in the {where} passed"
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["preRunningDeadlineSeconds"] = "1h"
    assert schema_errors(wrong_type, TARGET)


# --- the manifests --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PLURALS))
def test_kuberay_resources_validate_against_the_target_crds(kind):
    found = [(name, doc) for name, doc in ray_resources() if doc["kind"] == kind]
    assert len(found) == 1, kind
    name, doc = found[0]
    assert doc["apiVersion"] == "ray.io/v1", name
    assert schema_errors(doc, TARGET) == [], name
    assert operator_problems(doc) == [], name


def test_the_oldest_vendored_operator_would_refuse_only_the_pre_running_deadline():
    """KubeRay 1.5.1 knows every field used here but RayJob's preRunningDeadlineSeconds (1.6.0 on): the
    README says so and names the operator version to install."""
    refused = {doc["kind"]: schema_errors(doc, OLDEST) for _, doc in ray_resources()}
    assert refused["RayService"] == [] and refused["RayCluster"] == []
    assert len(refused["RayJob"]) == 1 and "'preRunningDeadlineSeconds' was unexpected" in refused["RayJob"][0]
    readme = (REPO_ROOT / "infra" / "README.md").read_text()
    assert f"--version {TARGET}" in readme and "preRunningDeadlineSeconds" in readme


def test_deployment_and_statefulset_pod_templates_validate_against_kubernetes_pod_template_schema():
    validator = jsonschema.Draft4Validator(pod_template_schema())
    found = documents({"Deployment", "StatefulSet"})
    assert {doc["metadata"]["name"] for _, doc in found} == {"mlflow", "mlflow-postgres", "gcs-redis"}
    for name, doc in found:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(doc["spec"]["template"])]
        assert errors == [], f"{name}:{doc['metadata']['name']}"


def test_operator_checks_catch_what_kuberay_refuses():
    docs = {doc["kind"]: doc for _, doc in ray_resources()}
    breakages = {
        "RayJob": [lambda s: s.update(preRunningDeadlineSeconds=0), lambda s: s.update(shutdownAfterJobFinishes=False),
                   lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=9)],
        "RayService": [lambda s: s["upgradeStrategy"].update(type="Recreate"),
                       lambda s: s["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update(
                           {"redis-password": "x"}),
                       lambda s: s["rayClusterConfig"].update(rayVersion="2.51.0")],
    }
    for kind, breaks in breakages.items():
        for break_it in breaks:
            broken = copy.deepcopy(docs[kind])
            break_it(broken["spec"])
            assert operator_problems(broken), kind
    timeout = copy.deepcopy(docs["RayService"])
    timeout["metadata"]["annotations"]["ray.io/initializing-timeout"] = "soon"
    assert operator_problems(timeout)
