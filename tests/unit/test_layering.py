"""The core library stands alone: it imports without Ray, and never imports the layers above it."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import REPO_ROOT

CORE = REPO_ROOT / "platform" / "llava_platform"
LAYERS_ABOVE = ("jobs", "pipelines", "serve", "infra", "tests")

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


def test_no_core_module_imports_a_layer_above_it_not_even_inside_a_function():
    offending = []
    for path in core_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offending += [f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {name}" for name in names
                          if name.split(".")[0] in LAYERS_ABOVE or name.split(".")[0] == "ray"]
    assert offending == []
