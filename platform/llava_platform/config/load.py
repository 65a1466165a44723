"""Load a recipe: YAML file (or a shipped recipe's name) + ``key.sub=value`` overrides -> ``Recipe``.

All problems are collected and raised together as one ``RecipeError`` whose lines each start with
the dotted path of the offending key, so a user fixes a recipe in one round trip.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from llava_platform.config.schema import Recipe


class RecipeError(ValueError):
    """A recipe that cannot be used; ``problems`` holds one ``dotted.path: message`` per mistake."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"recipe {source} has {len(problems)} problem(s):\n{lines}")


def shipped_recipes() -> dict[str, Path]:
    """Recipes that ship with the package, by name (file stem)."""
    folder = resources.files("llava_platform") / "recipes"
    return {Path(str(f)).stem: Path(str(f)) for f in folder.iterdir() if str(f).endswith(".yaml")}


def resolve_recipe_path(name_or_path: str) -> Path:
    """A path to an existing YAML file, or the name of a shipped recipe."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise RecipeError(
        name_or_path, [f"recipe: no such file, and no shipped recipe of that name; shipped: {sorted(shipped)}"]
    )


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """Set each ``a.b.c=value`` into ``raw`` in place (values parsed as YAML); return the problems."""
    problems = []
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            problems.append(f"{override}: overrides look like key.sub=value")
            continue
        parts = key.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"{'.'.join(parts[: i + 1])}: is a value, not a section; cannot set {key}")
                break
            node = child
        else:
            node[parts[-1]] = yaml.safe_load(text) if text else None
    return problems


def load_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> Recipe:
    """Resolve a recipe once: read the YAML, apply overrides, validate every field and rule.

    Raises:
        RecipeError: listing every problem with its dotted path (unknown keys name the allowed ones).
    """
    path = resolve_recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(str(path), [f"(file): not valid YAML: {err}"]) from err
    if not isinstance(raw, dict):
        raise RecipeError(str(path), ["(file): the top level of a recipe must be a mapping"])
    problems = apply_overrides(raw, overrides)
    if problems:
        raise RecipeError(str(path), problems)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(str(path), [_describe(e) for e in err.errors()]) from None
    if problems := recipe.problems():
        raise RecipeError(str(path), problems)
    return recipe


def _describe(error: Any) -> str:
    """One pydantic error as ``dotted.path: message``; unknown keys list the allowed ones."""
    loc = [str(part) for part in error["loc"]]
    path = ".".join(loc) or "(root)"
    if error["type"] == "extra_forbidden":
        allowed = sorted(_section_at(loc[:-1]).model_fields)
        return f"{path}: unknown key; allowed here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{path}: required"
    return f"{path}: {error['msg']} (got {error.get('input')!r})"


def _section_at(loc: list[str]) -> type[BaseModel]:
    """The pydantic model class that sits at a dotted location inside ``Recipe``."""
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            break
        candidates = [field.annotation, *get_args(field.annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return model


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML: what dry runs print and checkpoints store."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_argument_parser(description: str) -> argparse.ArgumentParser:
    """The common command line of every job: ``--recipe NAME|PATH [--dry-run] [key.sub=value ...]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--recipe", required=True, help=f"YAML path or shipped name: {sorted(shipped_recipes())}")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    return parser


def recipe_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Recipe:
    """Resolve ``--recipe`` + overrides once.

    On mistakes, print them all and exit with status 2; with ``--dry-run``, print the resolved
    recipe, each stage's batch split per worker count (``batch_plan``), each data mixture's sources
    (``mixture_plan``) and estimated memory per GPU
    (``llava_platform.train.memory``), and exit
    with status 0 (like ``--help``), before any cluster resource is claimed.
    """
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        parser.exit(2, f"{err}\n")
    if args.dry_run:
        from llava_platform.config.batch_plan import plan_batches
        from llava_platform.config.memory_plan import plan_recipe
        from llava_platform.config.mixture_plan import plan_mixtures

        print(recipe_to_yaml(recipe))
        print(plan_batches(recipe))
        if mixtures := plan_mixtures(recipe):
            print(mixtures)
        print(plan_recipe(recipe))
        parser.exit(0)
    return recipe
