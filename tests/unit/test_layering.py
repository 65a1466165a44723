"""The layers import downwards only, and the core library stands alone: it imports without Ray.

    core (platform/llava_platform)  <-  pipelines, serve (siblings)  <-  jobs  <-  tests

- the core never imports ``jobs``, ``pipelines``, ``serve``, ``infra`` or ``tests``, and never ``ray`` at
  import time (only ``RAY_AT_RUN_TIME`` modules, inside their functions: they start Ray actors);
- inside the core, packages import only packages below them in ``CORE_ORDER``;
- ``pipelines`` never imports ``serve`` or ``jobs``; ``serve`` never ``jobs`` or ``pipelines``; nothing in
  ``jobs``, ``pipelines`` or ``serve`` (the benchmark scripts included) imports ``tests``.
"""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import REPO_ROOT

CORE = REPO_ROOT / "platform" / "llava_platform"
LAYERS_ABOVE = ("jobs", "pipelines", "serve", "infra", "tests")
CORE_ORDER = [
    {"archs", "sampling", "storage"},
    {"data", "vllm_engine"},
    {"inference", "tracking", "datagen", "benchmarks"},
    {"model", "evaluation"},
    {"generation", "train"},
    {"config"},
    {"registry", "testing"},
]
"""The core's packages (and top-level modules), lowest first: each imports only those on lower lines."""
RAY_AT_RUN_TIME = {"generation/vllm.py"}
"""Core modules that import Ray inside their functions: the vLLM engine's client starts and calls a Ray actor."""
UPPER_LAYERS = {"pipelines": ("serve", "jobs", "tests"), "serve": ("jobs", "pipelines", "tests"),
                "jobs": ("tests",)}
"""What each upper layer must never import."""

WITHOUT_RAY = r"""
import importlib, importlib.abc, pkgutil, sys

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, NoRay())
import llava_platform
names = [m.name for m in pkgutil.walk_packages(llava_platform.__path__, "llava_platform.")]
for name in names:
    importlib.import_module(name)
assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules), "ray got imported"
print("\n".join(names))
"""


def core_modules() -> list:
    return sorted(CORE.rglob("*.py"))


def module_name(path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_core_module_imports_with_ray_not_installed():
    done = subprocess.run([sys.executable, "-c", WITHOUT_RAY], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(done.stdout.split()) == {module_name(p) for p in core_modules()} - {"llava_platform"}


def imports(path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, inside functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module or ""))
    return found


def test_no_core_module_imports_a_layer_above_it_not_even_inside_a_function():
    offending = []
    for path in core_modules():
        where = path.relative_to(CORE).as_posix()
        for line, name in imports(path):
            top = name.split(".")[0]
            if top in LAYERS_ABOVE or (top == "ray" and where not in RAY_AT_RUN_TIME):
                offending.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {name}")
    assert offending == []


def level(package: str) -> int:
    return next(i for i, names in enumerate(CORE_ORDER) if package in names)


def test_core_packages_import_only_packages_below_them():
    packages = {(p.relative_to(CORE).parts[0]).removesuffix(".py") for p in core_modules()} - {"__init__"}
    assert packages == set().union(*CORE_ORDER), "a core package or module is missing from CORE_ORDER"
    offending = []
    for path in core_modules():
        own = path.relative_to(CORE).parts[0].removesuffix(".py")
        for line, name in imports(path):
            parts = name.split(".")
            if parts[0] != "llava_platform" or len(parts) < 2 or parts[1] == own:
                continue
            if level(parts[1]) >= level(own):
                offending.append(f"{path.relative_to(REPO_ROOT)}:{line}: {own} imports {name}")
    assert offending == []


def test_the_upper_layers_import_only_downwards():
    offending = []
    for layer, forbidden in UPPER_LAYERS.items():
        for path in sorted((REPO_ROOT / layer).rglob("*.py")):
            offending += [f"{path.relative_to(REPO_ROOT)}:{line} imports {name}" for line, name in imports(path)
                          if name.split(".")[0] in forbidden]
    assert offending == []
