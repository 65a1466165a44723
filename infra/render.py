"""Generate what the manifests derive from the rest of the repository, and set the values that are yours.

    python -m infra.render                  # serveConfigV2 and the storage sizes (see below) into infra/k8s/
    python -m infra.render --check          # exit 1 if a manifest is not what would be written
    python -m infra.render --serve-config   # print the cluster's Serve config (`serve deploy` on a launcher cluster)

    # your cluster's values, kept until set again (any together; infra/README.md, "The values that are yours"):
    python -m infra.render --image ghcr.io/acme/llava-platform          # the image repository of every manifest
    python -m infra.render --gpu-node-selector cloud.google.com/gke-accelerator=nvidia-a100-80gb   # '' for none
    python -m infra.render --storage-class gp3                          # PostgreSQL's, Redis's volumes ('': default)
    python -m infra.render --shared-storage-class efs-sc                # the ReadWriteMany shared volume
    python -m infra.render --shared-permissions storage                 # chown (default) | storage

A RayService carries Ray Serve's config as a YAML string (``serveConfigV2``). Ours is never written by
hand: it is ``serve/config.yaml`` (what ``serve run`` takes locally) merged with
``infra/serve-cluster.yaml`` (what the cluster changes: model version, device, GPUs per replica,
autoscaling bounds), so a change to the local config reaches the cluster on the next render and the
two cannot drift apart (the tests re-render and compare).

The manifests stay hand-written YAML with comments; a line the renderer owns ends in
``# infra.render: <name>``, and only its value after ``key:`` is rewritten. Storage sizes are derived
from the models (``scratch_sizes``): the serving pods' model volume from the served checkpoint, the
training pods' scratch volume from the RayJob recipe's checkpoint state, MLflow's /tmp from both.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llava_platform.config import load_recipe, shipped_recipes
from llava_platform.config.memory_plan import stage_setup
from llava_platform.config.schema import Recipe, ServeConfig
from llava_platform.train.memory import estimate

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
SERVE_CONFIG = ROOT / "serve" / "config.yaml"
CLUSTER_OVERRIDES = ROOT / "infra" / "serve-cluster.yaml"
RAYSERVICE = K8S / "rayservice.yaml"
RAYJOB = K8S / "rayjob-pipeline.yaml"
MLFLOW = K8S / "mlflow.yaml"
BLOCK_START = "  serveConfigV2: |"
BLOCK_INDENT = " " * 4
IMAGE_LINE = re.compile(r"^(?P<key>\s*(?:- )?(?:image|head_image|worker_image): )(?P<repo>\S+):(?P<tag>[^:/\s]+)$",
                        re.M)
RENDERED_LINE = re.compile(r"^(?P<indent>[ \t]*)(?:# )?(?P<key>[\w./-]+): (?P<value>.*?)"
                           r"(?P<tag>  # infra\.render: (?P<name>[\w-]+))$", re.M)
"""A line whose value the renderer owns; commented out (``# key: ...``) where the setting is unset."""
UNSET = "unset"
"""The value a commented-out rendered line shows."""

GIB = 2**30
RAY_HEADROOM = 20 * GIB
"""Beside the model: Ray's session logs and spilled objects, pip and compile caches in the scratch space."""
TRAINING_STATE_BYTES_PER_TRAINABLE = 12
"""A DeepSpeed checkpoint's fp32 state per trainable parameter: master weight 4, Adam's two moments 8."""
CHECKPOINTS_IN_FLIGHT = 2
"""Training checkpoints a GPU pod holds at once: one Ray Train still uploads while the next is written
(or, when resuming on another world size, the checkpoint and its universal conversion)."""
MODEL_MARGIN = 1.1
"""The served checkpoint's files beyond the estimated weights: projector, tokenizer, processor and registry files."""
MLFLOW_TRANSFERS = 2
"""Model copies MLflow's proxy spools through /tmp at once: an upload from training, a download for a replica."""

SHARED_MOUNT = "/mnt/shared"
SHARED_PERMISSIONS = {
    # a root init container gives the volume's root folder to the image's user (uid/gid 1000) unless it has
    # it: volumes where the kubelet does not apply fsGroup (EFS without access points, NFS)
    "chown": {
        "command": (f"[sh, -c, 'test \"$(stat -c %u:%g {SHARED_MOUNT})\" = 1000:1000 || chown 1000:1000 "
                    f"{SHARED_MOUNT} || {{ echo \"{SHARED_MOUNT}: cannot give it to uid 1000 (an access point or "
                    "root squash decides its owner?): render with --shared-permissions storage\" >&2; exit 1; }']"),
        "securityContext": "{runAsUser: 0, runAsGroup: 0, runAsNonRoot: false}",
    },
    # the storage decides the owner (an EFS access point with uid/gid 1000, a CSI driver applying fsGroup): the
    # init container runs as the image's user and only checks that it can write, so no pod runs as root
    "storage": {
        "command": (f"[sh, -c, 'touch {SHARED_MOUNT}/.llava-write-test && rm {SHARED_MOUNT}/.llava-write-test || "
                    f"{{ echo \"{SHARED_MOUNT}: uid 1000 cannot write here; give the volume to uid/gid 1000 "
                    "(infra/README.md, step 3)\" >&2; exit 1; }']"),
        "securityContext": "{runAsUser: 1000, runAsGroup: 1000, runAsNonRoot: true}",
    },
}
"""How the shared volume becomes writable for uid 1000 (``--shared-permissions``): the init container's lines."""


class RenderError(ValueError):
    """The overrides or the Serve config do not fit together; the message names the key."""


def merge(base: Any, override: Any, where: str) -> Any:
    """``override`` laid over ``base``: mappings by key, lists of named entries by name, values replaced.

    Every key and name in ``override`` must already exist in ``base``, so a typo cannot add a setting
    that Ray Serve would silently ignore; except under an application's ``args`` (the app's
    ``ServeConfig``, which names every key it does not know: ``cluster_serve_config``), where
    ``serve/config.yaml`` writes only what differs from the defaults.
    """
    if isinstance(override, dict):
        base = {} if base is None and ".args" in where else base
        if not isinstance(base, dict):
            raise RenderError(f"{where}: is a value in {SERVE_CONFIG.name}, not a section")
        unknown = sorted(set(override) - set(base))
        if unknown and ".args" not in where:
            raise RenderError(f"{where}: {unknown} not in {SERVE_CONFIG.name}; keys there: {sorted(base)}")
        return {**base, **{key: merge(base.get(key), value, f"{where}.{key}") for key, value in override.items()}}
    if isinstance(override, list) and override and all(isinstance(i, dict) and "name" in i for i in override):
        entries = {item["name"]: item for item in base or []}
        unknown = [item["name"] for item in override if item["name"] not in entries]
        if unknown:
            raise RenderError(f"{where}: no entry named {unknown} in {SERVE_CONFIG.name}; names: {list(entries)}")
        merged = {item["name"]: merge(entries[item["name"]], item, f"{where}[{item['name']}]") for item in override}
        return [merged.get(item["name"], item) for item in base]
    return override


def cluster_serve_config() -> dict[str, Any]:
    """serve/config.yaml with the cluster's overrides, checked the way Ray Serve and our app will read it."""
    from ray.serve.schema import ServeDeploySchema

    base = yaml.safe_load(SERVE_CONFIG.read_text())
    config = merge(base, yaml.safe_load(CLUSTER_OVERRIDES.read_text()), CLUSTER_OVERRIDES.name)
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        try:
            ServeConfig.model_validate(app.get("args", {}))
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise RenderError(f"applications[{app['name']}].args: {problems} (config.schema.ServeConfig)") from error
    return config


def serve_config_text(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False, width=100)


def with_serve_config(manifest: str, serve_config: str) -> str:
    """``manifest`` with the block under ``serveConfigV2: |`` replaced by ``serve_config``."""
    lines = manifest.splitlines()
    if BLOCK_START not in lines:
        raise RenderError(f"{RAYSERVICE.name}: no line {BLOCK_START!r}")
    start = lines.index(BLOCK_START) + 1
    end = start
    while end < len(lines) and (lines[end].startswith(BLOCK_INDENT) or not lines[end].strip()):
        end += 1
    block = [BLOCK_INDENT + line if line else line for line in serve_config.splitlines()]
    return "\n".join(lines[:start] + block + lines[end:]) + "\n"


# --- lines the renderer owns --------------------------------------------------------------------


def with_values(text: str, values: Mapping[str, Mapping[str, str | None]]) -> str:
    """``text`` with every line tagged ``# infra.render: <name>`` (``name`` in ``values``) set to
    ``values[name][key]``; ``None`` comments the line out (the field is then unset). Lines of other names stay.

    Raises:
        RenderError: a tagged line's key is not one its setting writes.
    """

    def replace(match: re.Match[str]) -> str:
        if match["name"] not in values:
            return match[0]
        by_key = values[match["name"]]
        if match["key"] not in by_key:
            raise RenderError(f"a line tagged {match['name']!r} sets {match['key']!r}; the setting writes "
                              f"{sorted(by_key)}")
        value = by_key[match["key"]]
        line = f"{match['key']}: {UNSET if value is None else value}{match['tag']}"
        return f"{match['indent']}{'# ' if value is None else ''}{line}"

    return RENDERED_LINE.sub(replace, text)


def rendered_names(text: str) -> set[str]:
    """The names of the settings whose lines ``text`` holds."""
    return {match["name"] for match in RENDERED_LINE.finditer(text)}


def flow_mapping(pairs: Mapping[str, str]) -> str:
    """``{key: value, ...}`` on one line, quoted where YAML needs it."""
    return yaml.safe_dump(dict(pairs), default_flow_style=True, width=10**6).strip()


def node_selector_values(selector: str) -> dict[str, dict[str, str | None]]:
    """``--gpu-node-selector KEY=VALUE[,KEY=VALUE]`` (``''``: none) as the GPU pods' ``nodeSelector``."""
    pairs = [pair for pair in selector.split(",") if pair.strip()]
    malformed = [pair for pair in pairs if pair.count("=") != 1 or not pair.split("=")[0].strip()]
    if malformed:
        raise RenderError(f"--gpu-node-selector: {malformed} is not KEY=VALUE (a node label, e.g. "
                          "cloud.google.com/gke-accelerator=nvidia-a100-80gb)")
    labels = {key.strip(): value.strip() for key, value in (pair.split("=") for pair in pairs)}
    return {"gpu-node-selector": {"nodeSelector": flow_mapping(labels)}}


def storage_class_values(name: str, setting: str) -> dict[str, dict[str, str | None]]:
    """``storageClassName`` of the volumes tagged ``setting``; ``''``: unset, the cluster's default class."""
    if name and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name):
        raise RenderError(f"--{setting}: {name!r} is not a storage class name (lower case, digits, '-', '.')")
    return {setting: {"storageClassName": name or None}}


# --- storage sizes from the models --------------------------------------------------------------


def export_bytes(recipe: Recipe) -> int:
    """The served checkpoint (the last stage's export): every parameter at the stage's precision."""
    stage = list(recipe.stages().values())[-1]
    bytes_per_param = 4 if stage.deepspeed.precision == "fp32" else 2
    return estimate(stage_setup(recipe, stage)).total_params * bytes_per_param


def checkpoint_state_bytes(recipe: Recipe, pods: int) -> int:
    """The largest stage's training checkpoint on one of ``pods`` GPU pods: the 16-bit weights whole (rank 0
    writes them below ZeRO-3; a bound at ZeRO-3) and the pod's share of the fp32 optimizer state."""
    sizes = []
    for stage in recipe.stages().values():
        memory = estimate(stage_setup(recipe, stage))
        weight_bytes = 4 if stage.deepspeed.precision == "fp32" else 2
        optimizer = TRAINING_STATE_BYTES_PER_TRAINABLE * memory.trainable_params // pods
        sizes.append(weight_bytes * memory.total_params + optimizer)
    return max(sizes)


def gibibytes(size: int) -> str:
    """A Kubernetes quantity: ``size`` bytes rounded up to whole GiB."""
    return f"{math.ceil(size / GIB)}Gi"


@dataclass(frozen=True)
class Scratch:
    """Local disk of one pod: the emptyDir volume for the big files and the pod's ephemeral-storage request
    (the volume, the container's writable layer and its logs)."""

    volume: int
    request: int

    def values(self) -> dict[str, str]:
        return {"sizeLimit": gibibytes(self.volume), "ephemeral-storage": gibibytes(self.request)}


def serve_scratch(recipe: Recipe, replicas_per_pod: int) -> Scratch:
    """A serving GPU pod: each of its replicas downloads the checkpoint into the model volume (``cache_dir``)."""
    models = int(replicas_per_pod * export_bytes(recipe) * MODEL_MARGIN)
    return Scratch(volume=models, request=models + RAY_HEADROOM)


def train_scratch(recipe: Recipe, pods: int) -> Scratch:
    """A training GPU pod: checkpoints are written to ``TMPDIR`` (the scratch volume) before Ray Train
    uploads them, with Ray's own files beside them."""
    volume = CHECKPOINTS_IN_FLIGHT * checkpoint_state_bytes(recipe, pods) + RAY_HEADROOM
    return Scratch(volume=volume, request=volume)


def mlflow_scratch(recipes: list[Recipe]) -> Scratch:
    """The MLflow server: proxied artifacts pass through its /tmp, file by file, for up to two transfers at once."""
    volume = MLFLOW_TRANSFERS * max(map(export_bytes, recipes)) + 2 * GIB
    return Scratch(volume=volume, request=volume)


def rayjob_recipe() -> Recipe:
    """The RayJob's recipe with its overrides, as its entrypoint (``python -m jobs.pipeline --recipe ...``) loads it."""
    command = shlex.split(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"])
    if "--recipe" not in command:
        raise RenderError(f"{RAYJOB.name}: the entrypoint names no --recipe")
    overrides = [arg for arg in command[3:] if "=" in arg and not arg.startswith("-")]
    return load_recipe(command[command.index("--recipe") + 1], overrides)


def served_recipe(model_uri: str) -> Recipe:
    """The shipped recipe that registers the model ``models:/<name>/<version>`` serves.

    Raises:
        RenderError: no shipped recipe registers that name.
    """
    match = re.fullmatch(r"models:/([^/]+)/[^/]+", model_uri)
    if match is None:
        raise RenderError(f"{CLUSTER_OVERRIDES.name}: model {model_uri!r} is not models:/<name>/<version>; the "
                          "model volume is sized from the recipe that registers it")
    for name in shipped_recipes():
        recipe = load_recipe(name)
        if (recipe.tracking.registered_model or recipe.name) == match[1]:
            return recipe
    raise RenderError(f"{CLUSTER_OVERRIDES.name}: no shipped recipe registers {match[1]!r}, so the model volume "
                      "cannot be sized")


def gpu_group(manifest: Path, cluster_key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``gpu`` worker group of a manifest's Ray cluster, and its Ray container."""
    spec = yaml.safe_load(manifest.read_text())["spec"][cluster_key]
    group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    return group, group["template"]["spec"]["containers"][0]


def scratch_sizes(serve_config: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The rendered sizes by setting name: ``serve-scratch``, ``train-scratch`` and ``mlflow-scratch``."""
    app = serve_config["applications"][0]
    served = served_recipe(app["args"]["model"])
    replica_gpus = app["deployments"][0]["ray_actor_options"]["num_gpus"]
    _, serve_worker = gpu_group(RAYSERVICE, "rayClusterConfig")
    pod_gpus = int(serve_worker["resources"]["limits"]["nvidia.com/gpu"])
    trained = rayjob_recipe()
    train_group, _ = gpu_group(RAYJOB, "rayClusterSpec")
    return {"serve-scratch": serve_scratch(served, max(1, int(pod_gpus // replica_gpus))).values(),
            "train-scratch": train_scratch(trained, train_group["maxReplicas"]).values(),
            "mlflow-scratch": mlflow_scratch([served, trained]).values()}


def rendered_manifests() -> dict[Path, str]:
    """Each manifest with derived content, as ``python -m infra.render`` writes it."""
    serve_config = cluster_serve_config()
    sizes = scratch_sizes(serve_config)
    rendered = {RAYSERVICE: with_serve_config(RAYSERVICE.read_text(), serve_config_text(serve_config))}
    for path in (RAYSERVICE, RAYJOB, MLFLOW):
        rendered[path] = with_values(rendered.get(path, path.read_text()), sizes)
    return rendered


def rendered_rayservice() -> str:
    return rendered_manifests()[RAYSERVICE]


# --- images -------------------------------------------------------------------------------------


def with_image(text: str, repository: str, version: str) -> str:
    """Every ``image:`` line that names our image (``...llava-platform:<version>-<variant>``) moved to
    ``repository:<version>-<variant>``; the repository may hold a registry port (``host:5000/team/name``)."""

    def replace(match: re.Match[str]) -> str:
        if not match["repo"].endswith("llava-platform"):
            return match[0]
        variant = match["tag"].rsplit("-", 1)[-1]
        return f"{match['key']}{repository}:{version}-{variant}"

    return IMAGE_LINE.sub(replace, text)


def checked_repository(repository: str) -> str:
    """``--image``: a repository without tag or digest, ending in ``llava-platform`` (what ``with_image`` finds
    again the next time).

    Raises:
        RenderError: a tag, a digest, or another last path component.
    """
    last = repository.rsplit("/", 1)[-1]
    if "@" in repository or ":" in last or last != "llava-platform":
        raise RenderError(f"--image: {repository!r} is not a repository ending in /llava-platform without a tag "
                          "(e.g. registry.internal:5000/ml/llava-platform); the tags are <version>-<cpu|cuda>")
    return repository


def image_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml")) + sorted((ROOT / "infra" / "launcher").glob("*.yaml"))


def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    if match is None:
        raise RenderError("pyproject.toml: no version")
    return match[1]


# --- command line -------------------------------------------------------------------------------


def cluster_values(args: argparse.Namespace) -> dict[str, dict[str, str | None]]:
    """The settings given on the command line, by the name their lines carry."""
    values: dict[str, dict[str, str | None]] = {}
    if args.gpu_node_selector is not None:
        values |= node_selector_values(args.gpu_node_selector)
    if args.storage_class is not None:
        values |= storage_class_values(args.storage_class, "storage-class")
    if args.shared_storage_class is not None:
        values |= storage_class_values(args.shared_storage_class, "shared-storage-class")
    if args.shared_permissions is not None:
        values["shared-permissions"] = dict(SHARED_PERMISSIONS[args.shared_permissions])
    return values


def set_cluster_values(args: argparse.Namespace) -> list[str]:
    """Write the command line's settings into every file that has their lines; returns what changed where."""
    values = cluster_values(args)
    changes = []
    for path in image_files():
        text = path.read_text()
        updated = with_values(text, values)
        if args.image:
            updated = with_image(updated, checked_repository(args.image), project_version())
        if updated != text:
            path.write_text(updated)
            changes.append(f"{path.parent.name}/{path.name}")
    missing = sorted(set(values) - set().union(*(rendered_names(p.read_text()) for p in image_files())))
    if missing:
        raise RenderError(f"no manifest has lines for {missing}")
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if a manifest differs from the rendering")
    mode.add_argument("--serve-config", action="store_true", help="print the cluster's Serve config and exit")
    values = parser.add_argument_group("your cluster's values (kept in the manifests until set again)")
    values.add_argument("--image", metavar="REPOSITORY", help="the image repository of every manifest")
    values.add_argument("--gpu-node-selector", metavar="KEY=VALUE[,...]",
                        help="node labels GPU pods must match ('' for none: GPU requests and tolerations decide)")
    values.add_argument("--storage-class", metavar="NAME",
                        help="storage class of PostgreSQL's and Redis's volumes ('' for the cluster's default)")
    values.add_argument("--shared-storage-class", metavar="NAME", help="ReadWriteMany class of the shared volume")
    values.add_argument("--shared-permissions", choices=sorted(SHARED_PERMISSIONS),
                        help="chown: a root init container gives the shared volume to uid 1000; storage: the "
                             "storage does (e.g. an EFS access point), pods only check")
    args = parser.parse_args(argv)
    setting = any(v is not None for v in (args.image, args.gpu_node_selector, args.storage_class,
                                          args.shared_storage_class, args.shared_permissions))
    if setting and (args.check or args.serve_config):
        parser.error("set values on their own, then render or check")
    try:
        if setting:
            changed = set_cluster_values(args)
            print(f"set in {len(changed)} files: {', '.join(changed) or 'nothing changed'}")
            return 0
        if args.serve_config:
            print(serve_config_text(cluster_serve_config()), end="")
            return 0
        rendered = rendered_manifests()
    except RenderError as error:
        print(f"infra.render: {error}", file=sys.stderr)
        return 2
    stale = {path: text for path, text in rendered.items() if path.read_text() != text}
    if args.check:
        for path, text in stale.items():
            diff = difflib.unified_diff(path.read_text().splitlines(True), text.splitlines(True), "committed",
                                        "rendered")
            print(f"{path} is out of date; run `python -m infra.render`:\n{''.join(diff)}", file=sys.stderr)
        return 1 if stale else 0
    for path, text in stale.items():
        path.write_text(text)
    print(f"rendered {', '.join(p.name for p in rendered)}: {len(stale)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
