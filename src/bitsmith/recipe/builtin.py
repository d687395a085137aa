"""Built-in recipes (YAML files shipped inside the package) and loading a user's recipe file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from bitsmith.recipe.recipe import Recipe, config_from_yaml
from bitsmith.errors import BitsmithError

__all__ = ["builtin_recipes", "load_recipe"]


def builtin_recipes() -> dict[str, Path]:
    folder = resources.files("bitsmith.recipe") / "builtin"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a YAML file path."""
    builtins = builtin_recipes()
    if name_or_path in builtins:
        return config_from_yaml(builtins[name_or_path])
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise BitsmithError(f"recipe file not found: {path}")
        return config_from_yaml(path)
    raise BitsmithError(f"unknown recipe '{name_or_path}'; built-in recipes: {', '.join(sorted(builtins))}")
