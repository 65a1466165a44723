"""Generate the cluster's Ray Serve config from the local one, and point the manifests at an image.

    python -m infra.render                  # write serveConfigV2 into infra/k8s/rayservice.yaml
    python -m infra.render --check          # exit 1 if rayservice.yaml is not what would be written
    python -m infra.render --serve-config   # print the cluster's Serve config (`serve deploy` on a launcher cluster)
    python -m infra.render --image ghcr.io/acme/llava-platform   # the image repository of every manifest

A RayService carries Ray Serve's config as a YAML string (``serveConfigV2``). Ours is never written by
hand: it is ``serve/config.yaml`` (what ``serve run`` takes locally) merged with
``infra/serve-cluster.yaml`` (what the cluster changes: model version, device, GPUs per replica,
autoscaling bounds), so a change to the local config reaches the cluster on the next render and the
two cannot drift apart (the tests re-render and compare).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llava_platform.config.schema import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve" / "config.yaml"
CLUSTER_OVERRIDES = ROOT / "infra" / "serve-cluster.yaml"
RAYSERVICE = ROOT / "infra" / "k8s" / "rayservice.yaml"
BLOCK_START = "  serveConfigV2: |"
BLOCK_INDENT = " " * 4
IMAGE_LINE = re.compile(r"^(?P<key>\s*(?:- )?(?:image|head_image|worker_image): )(?P<repo>\S+?):(?P<tag>\S+)$", re.M)


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


def rendered_rayservice() -> str:
    return with_serve_config(RAYSERVICE.read_text(), serve_config_text(cluster_serve_config()))


def with_image(text: str, repository: str, version: str) -> str:
    """Every ``image:`` line that names our image (``...llava-platform:<version>-<variant>``) moved to
    ``repository:<version>-<variant>``."""

    def replace(match: re.Match[str]) -> str:
        if not match["repo"].endswith("llava-platform"):
            return match[0]
        variant = match["tag"].rsplit("-", 1)[-1]
        return f"{match['key']}{repository}:{version}-{variant}"

    return IMAGE_LINE.sub(replace, text)


def image_files() -> list[Path]:
    return sorted((ROOT / "infra" / "k8s").glob("*.yaml")) + sorted((ROOT / "infra" / "launcher").glob("*.yaml"))


def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    if match is None:
        raise RenderError("pyproject.toml: no version")
    return match[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if rayservice.yaml differs from the rendering")
    mode.add_argument("--serve-config", action="store_true", help="print the cluster's Serve config and exit")
    mode.add_argument("--image", metavar="REPOSITORY", help="set the image repository in every manifest")
    args = parser.parse_args(argv)
    try:
        if args.image:
            for path in image_files():
                path.write_text(with_image(path.read_text(), args.image, project_version()))
            print(f"images -> {args.image}:{project_version()}-<cpu|cuda> in {len(image_files())} files")
            return 0
        if args.serve_config:
            print(serve_config_text(cluster_serve_config()), end="")
            return 0
        current, rendered = RAYSERVICE.read_text(), rendered_rayservice()
    except RenderError as error:
        print(f"infra.render: {error}", file=sys.stderr)
        return 2
    if args.check:
        if current != rendered:
            diff = difflib.unified_diff(current.splitlines(True), rendered.splitlines(True), "committed", "rendered")
            print(f"{RAYSERVICE} is out of date; run `python -m infra.render`:\n{''.join(diff)}", file=sys.stderr)
            return 1
        return 0
    RAYSERVICE.write_text(rendered)
    print(f"wrote serveConfigV2 of {RAYSERVICE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
