"""infra/render.py: image repositories, the settings it writes into the manifests, and the disk sizes it derives
from the models. Manifests are copied into a temporary folder before anything is written."""

from __future__ import annotations

import shutil

import pytest
import yaml

from infra import render
from llava_platform.config import load_recipe

PORT_REPOSITORY = "registry.internal:5000/ml/llava-platform"


@pytest.fixture
def manifests(tmp_path, monkeypatch):
    """A copy of infra/k8s and infra/launcher the renderer reads and writes instead of the real ones."""
    k8s, launcher = tmp_path / "k8s", tmp_path / "launcher"
    shutil.copytree(render.K8S, k8s)
    shutil.copytree(render.ROOT / "infra" / "launcher", launcher)
    monkeypatch.setattr(render, "image_files", lambda: sorted(k8s.glob("*.yaml")) + sorted(launcher.glob("*.yaml")))
    for name in ("RAYSERVICE", "RAYJOB", "MLFLOW"):
        monkeypatch.setattr(render, name, k8s / getattr(render, name).name)
    return k8s


def images(text: str) -> list[str]:
    return [line.split("image: ")[1] for line in text.splitlines() if "llava-platform:" in line]


# --- images -------------------------------------------------------------------------------------


def test_image_repository_with_a_registry_port_is_set_and_set_again():
    text = (render.K8S / "rayservice.yaml").read_text()
    once = render.with_image(text, PORT_REPOSITORY, "0.1.0")
    assert images(once) == [f"{PORT_REPOSITORY}:0.1.0-cpu", f"{PORT_REPOSITORY}:0.1.0-cuda"]
    again = render.with_image(once, "ghcr.io/acme/llava-platform", "0.2.0")
    assert images(again) == ["ghcr.io/acme/llava-platform:0.2.0-cpu", "ghcr.io/acme/llava-platform:0.2.0-cuda"]
    assert render.with_image(once, PORT_REPOSITORY, "0.1.0") == once


@pytest.mark.parametrize("bad", ["ghcr.io/acme/llava-platform:1.0", "ghcr.io/acme/llava-platform@sha256:ab",
                                 "ghcr.io/acme/other", "registry:5000"])
def test_image_option_refuses_what_it_could_not_find_again(bad):
    with pytest.raises(render.RenderError, match="--image"):
        render.checked_repository(bad)
    assert render.checked_repository(PORT_REPOSITORY) == PORT_REPOSITORY


def test_image_option_writes_every_manifest(manifests, capsys):
    assert render.main(["--image", PORT_REPOSITORY]) == 0
    found = [image for path in render.image_files() for image in images(path.read_text())]
    assert len(found) == 11 and all(i.startswith(f"{PORT_REPOSITORY}:0.1.0-") for i in found)
    assert render.main(["--image", PORT_REPOSITORY]) == 0
    assert "nothing changed" in capsys.readouterr().out


# --- settings -----------------------------------------------------------------------------------


def gpu_selectors(k8s) -> dict[str, dict[str, str]]:
    selectors = {}
    for path in sorted(k8s.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {})
            cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
            for group in cluster.get("workerGroupSpecs", []):
                if "nodeSelector" in group["template"]["spec"]:
                    selectors[f"{path.name}[{group['groupName']}]"] = group["template"]["spec"]["nodeSelector"]
    return selectors


def test_gpu_node_selector_is_set_on_every_gpu_group_and_cleared(manifests):
    assert render.main(["--gpu-node-selector", "cloud.google.com/gke-accelerator=nvidia-a100-80gb,pool=gpu"]) == 0
    expected = {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb", "pool": "gpu"}
    assert gpu_selectors(manifests) == {f"{name}[gpu]": expected for name in
                                        ("raycluster.yaml", "rayjob-pipeline.yaml", "rayservice.yaml")}
    assert render.main(["--gpu-node-selector", ""]) == 0
    assert set(map(str, gpu_selectors(manifests).values())) == {"{}"}
    for path in manifests.glob("*.yaml"):
        assert path.read_text() == (render.K8S / path.name).read_text(), "back to the shipped files"
    with pytest.raises(render.RenderError, match="KEY=VALUE"):
        render.node_selector_values("a100")


def test_storage_classes_are_set_and_unset(manifests):
    def classes() -> dict[str, str | None]:
        found = {}
        for path in sorted(manifests.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc["kind"] == "StatefulSet":
                    found[doc["metadata"]["name"]] = doc["spec"]["volumeClaimTemplates"][0]["spec"].get(
                        "storageClassName")
                if doc and doc["kind"] == "PersistentVolumeClaim":
                    found[doc["metadata"]["name"]] = doc["spec"].get("storageClassName")
        return found

    assert classes() == {"llava-shared": "efs-sc", "mlflow-postgres": None, "gcs-redis": None}
    assert render.main(["--storage-class", "gp3", "--shared-storage-class", "filestore-rwx"]) == 0
    assert classes() == {"llava-shared": "filestore-rwx", "mlflow-postgres": "gp3", "gcs-redis": "gp3"}
    assert render.main(["--storage-class", ""]) == 0
    assert classes() == {"llava-shared": "filestore-rwx", "mlflow-postgres": None, "gcs-redis": None}
    assert render.main(["--storage-class", "Fast_SSD"]) == 2


def test_shared_permissions_switch_the_init_container_of_every_pod_that_mounts_the_volume(manifests):
    def setups() -> list[dict]:
        found = []
        for name in ("rayjob-pipeline.yaml", "raycluster.yaml"):
            doc = yaml.safe_load((manifests / name).read_text())
            cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                found += [c for c in group["template"]["spec"]["initContainers"] if c["name"] == "shared-volume"]
        return found

    assert len(setups()) == 6 and all(c["securityContext"]["runAsUser"] == 0 for c in setups())
    assert render.main(["--shared-permissions", "storage"]) == 0
    assert all(c["securityContext"] == {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True} and
               "touch /mnt/shared/" in c["command"][2] for c in setups())
    assert render.main(["--shared-permissions", "chown"]) == 0
    assert (manifests / "rayjob-pipeline.yaml").read_text() == (render.K8S / "rayjob-pipeline.yaml").read_text()


def test_a_tagged_line_with_a_key_its_setting_does_not_write_is_refused():
    text = "spec:\n  storageClass: gp3  # infra.render: storage-class\n"
    with pytest.raises(render.RenderError, match="storageClassName"):
        render.with_values(text, render.storage_class_values("gp3", "storage-class"))
    assert render.with_values(text, {}) == text


def test_settings_and_check_do_not_mix(manifests):
    with pytest.raises(SystemExit):
        render.main(["--check", "--storage-class", "gp3"])


# --- sizes from the models ----------------------------------------------------------------------


def test_export_and_checkpoint_sizes_follow_the_parameter_counts():
    seven, thirteen, lora = (load_recipe(n) for n in ("llava15_7b", "llava15_13b", "llava15_7b_lora"))
    # LLaVA-1.5 7B: Vicuna-7B 6.74 B + CLIP ViT-L/336 0.30 B + projector 0.02 B, in bf16
    assert 14.0e9 < render.export_bytes(seven) < 14.3e9
    assert render.export_bytes(thirteen) > 1.8 * render.export_bytes(seven)
    # the full stage 2: bf16 weights 2 + fp32 state 12 bytes per parameter, about 95 GB on one pod
    assert 90e9 < render.checkpoint_state_bytes(seven, pods=1) < 100e9
    assert render.checkpoint_state_bytes(seven, pods=2) < render.checkpoint_state_bytes(seven, pods=1)
    assert render.checkpoint_state_bytes(lora, pods=1) < 0.3 * render.checkpoint_state_bytes(seven, pods=1)


def test_scratch_sizes_add_copies_in_flight_and_headroom():
    recipe = load_recipe("llava15_7b")
    serve = render.serve_scratch(recipe, replicas_per_pod=2)
    assert serve.volume == int(2 * render.export_bytes(recipe) * render.MODEL_MARGIN)
    assert serve.request == serve.volume + render.RAY_HEADROOM
    train = render.train_scratch(recipe, pods=1)
    assert train.volume == train.request == 2 * render.checkpoint_state_bytes(recipe, 1) + render.RAY_HEADROOM
    assert render.gibibytes(render.GIB + 1) == "2Gi" and render.gibibytes(render.GIB) == "1Gi"


def test_committed_manifests_carry_the_rendered_sizes():
    sizes = render.scratch_sizes(render.cluster_serve_config())
    assert sizes == {"serve-scratch": {"sizeLimit": "15Gi", "ephemeral-storage": "35Gi"},
                     "train-scratch": {"sizeLimit": "198Gi", "ephemeral-storage": "198Gi"},
                     "mlflow-scratch": {"sizeLimit": "29Gi", "ephemeral-storage": "29Gi"}}
    for path, text in render.rendered_manifests().items():
        assert path.read_text() == text, f"{path.name} is stale: run `python -m infra.render`"


def test_interactive_clusters_fixed_scratch_holds_the_gpu_recipes_it_is_for():
    doc = yaml.safe_load((render.K8S / "raycluster.yaml").read_text())
    gpu = next(g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    pod = gpu["template"]["spec"]
    per_pod = int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    size = next(v for v in pod["volumes"] if v["name"] == "scratch")["emptyDir"]["sizeLimit"]
    for name in ("llava15_7b", "llava15_13b", "llava15_7b_lora", "llava_next_vicuna_7b"):
        recipe = load_recipe(name)
        pods = -(-recipe.scaling.num_workers * recipe.scaling.gpus_per_worker // per_pod)
        assert int(size.removesuffix("Gi")) * render.GIB >= render.train_scratch(recipe, int(pods)).volume, name


def test_check_fails_on_stale_sizes_and_render_fixes_them(manifests):
    job = manifests / "rayjob-pipeline.yaml"
    job.write_text(job.read_text().replace("sizeLimit: 198Gi", "sizeLimit: 1Gi"))
    assert render.main(["--check"]) == 1
    assert render.main([]) == 0
    assert render.main(["--check"]) == 0 and "sizeLimit: 198Gi" in job.read_text()


def test_a_served_model_no_recipe_registers_cannot_be_sized():
    with pytest.raises(render.RenderError, match="no shipped recipe registers 'nobody'"):
        render.served_recipe("models:/nobody/3")
    with pytest.raises(render.RenderError, match="models:/<name>/<version>"):
        render.served_recipe("s3://bucket/model")
    assert render.served_recipe("models:/llava15-7b/1").name == "llava15-7b"
