"""Every recipe shipped under recipes/ validates."""

from pathlib import Path

import pytest

from slimkit.recipe import Recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_shipped_recipes():
    assert RECIPES, "recipes/ holds at least the demo recipe"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_is_valid(path):
    recipe = Recipe.from_file(path)
    assert recipe.stages and recipe.spec.name == path.stem
