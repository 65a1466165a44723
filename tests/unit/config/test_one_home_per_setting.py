"""Every setting's default is written once, in the typed recipe and configs (``config/schema.py``).

Anywhere else a setting's default would be a second home that can drift. The rule, checked on the source
of every module above the schema (the core library, ``jobs/``, ``pipelines/``, ``serve/``):

- no function parameter, dataclass field or command-line flag named like a setting has a literal default
  equal to that setting's default (specs built by a section's ``build()`` take every value from it; flags
  take theirs from the schema);
- ``serve/config.yaml`` restates no default of the Serve config.

The performance scripts (``jobs/perf/``) are left out: their flags size the workload they measure.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from pydantic import BaseModel

from llava_platform.config import schema
from tests.helpers import REPO_ROOT

SOURCES = [*(REPO_ROOT / "platform" / "llava_platform").rglob("*.py"), *(REPO_ROOT / "jobs").glob("*.py"),
           *(REPO_ROOT / "pipelines").rglob("*.py"), *(REPO_ROOT / "serve").rglob("*.py")]
SCHEMA = REPO_ROOT / "platform" / "llava_platform" / "config" / "schema.py"
GENERIC = {"name", "seed", "r", "alpha", "dropout", "uri", "experiment", "data", "model", "video", "tiny", "lora",
           "optim", "deepspeed", "scaling", "tracking", "checkpoint", "synthetic", "evaluation", "limits", "vllm",
           "api_key", "max_tokens"}
"""Field names too common to be one setting wherever they appear: a function's ``seed=0`` is its own, every
endpoint client has an ``api_key``, every OpenAI request a ``max_tokens``."""


def sections() -> list[type[BaseModel]]:
    return [value for value in vars(schema).values()
            if isinstance(value, type) and issubclass(value, schema.Section) and value is not schema.Section]


def setting_defaults() -> dict[str, list]:
    """Setting name -> the defaults it has in the sections that define it (required fields have none)."""
    found: dict[str, list] = {}
    for section in sections():
        for name, field in section.model_fields.items():
            if not field.is_required() and name not in GENERIC:
                found.setdefault(name, []).append(field.get_default(call_default_factory=True))
    return found


def restates(node: ast.AST | None, defaults: list) -> bool:
    """A default written as a value here (a literal, not ``None``) equal to the setting's default."""
    if node is None or (isinstance(node, ast.Constant) and node.value is None):
        return False
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return False  # taken from somewhere else (a name, a call): not written here
    return any(value == default or (isinstance(default, tuple) and list(default) == value) for default in defaults)


def restated(path: Path, defaults: dict[str, list]) -> list[str]:
    """``file:line name`` of each parameter, dataclass field and flag named like a setting that restates its default."""
    tree, found = ast.parse(path.read_text()), []
    where = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path.name
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            pairs = [*zip(positional[len(positional) - len(args.defaults):], args.defaults, strict=True),
                     *zip(args.kwonlyargs, args.kw_defaults, strict=True)]
            found += [f"{where}:{arg.lineno} parameter {arg.arg}" for arg, default in pairs
                      if arg.arg in defaults and restates(default, defaults[arg.arg])]
        elif isinstance(node, ast.ClassDef):
            found += [f"{where}:{item.lineno} field {item.target.id}" for item in node.body
                      if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                      and item.target.id in defaults and restates(item.value, defaults[item.target.id])]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            dest = next((k.value.value for k in node.keywords if k.arg == "dest" and isinstance(k.value, ast.Constant)),
                        None) or (flags[-1].lstrip("-").replace("-", "_") if flags else "")
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if dest in defaults and restates(default, defaults[dest]):
                found.append(f"{where}:{node.lineno} flag {flags[-1]}")
    return found


def test_no_setting_default_is_written_outside_the_schema():
    defaults = setting_defaults()
    assert {"max_image_pixels", "frames", "max_new_tokens", "max_images", "video_frames", "dtype"} <= set(defaults)
    violations = [v for path in SOURCES if path != SCHEMA for v in restated(path, defaults)]
    assert not violations, "defaults restated outside config/schema.py:\n" + "\n".join(violations)


def test_the_serve_config_restates_no_default():
    config = yaml.safe_load((REPO_ROOT / "serve" / "config.yaml").read_text())
    args = config["applications"][0]["args"]
    serve_config = schema.ServeConfig.model_validate(args)
    defaults = schema.ServeConfig.model_construct()
    same = [key for key in args if key not in ("model",) and getattr(serve_config, key) == getattr(defaults, key, None)]
    limits = args.get("limits", {})
    same += [f"limits.{key}" for key, value in limits.items() if getattr(schema.ServeLimits(), key) == value]
    same += [f"vllm.{key}" for key, value in args.get("vllm", {}).items() if getattr(schema.VllmConfig(), key) == value]
    assert not same, f"serve/config.yaml restates the schema's defaults of {same}: leave them out"


def test_the_rule_catches_a_restated_default(tmp_path):
    """Negative control: a parameter, a dataclass field and a flag each restating a setting's default."""
    planted = tmp_path / "planted.py"
    planted.write_text("import argparse\nfrom dataclasses import dataclass\n\n"
                       "def tile(image, max_image_pixels=50_000_000):\n    pass\n\n"
                       "@dataclass\nclass Spec:\n    frames: int = 8\n\n"
                       "parser = argparse.ArgumentParser()\nparser.add_argument('--max-new-tokens', default=16)\n")
    found = restated(planted, setting_defaults())
    assert [v.split(" ", 1)[1] for v in found] == ["parameter max_image_pixels", "field frames",
                                                   "flag --max-new-tokens"]
