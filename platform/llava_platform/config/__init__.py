"""Typed recipes: schema, loading with overrides, and validation errors with dotted paths."""

from llava_platform.config.load import (
    RecipeError,
    load_recipe,
    recipe_argument_parser,
    recipe_from_args,
    recipe_to_yaml,
    shipped_recipes,
)
from llava_platform.config.schema import Recipe, StageConfig

__all__ = [
    "Recipe",
    "RecipeError",
    "StageConfig",
    "load_recipe",
    "recipe_argument_parser",
    "recipe_from_args",
    "recipe_to_yaml",
    "shipped_recipes",
]
