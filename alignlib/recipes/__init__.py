"""The shipped recipes: one YAML of `alignlib train` settings per stage of each tutorial users learned from.

Each `alignlib/recipes/NAME.yaml` is a plain mapping of settings, read by `--config` as any YAML
is (`alignlib train OBJECTIVE --config NAME` finds it by name when no file of that name exists);
its comments say where each value comes from and what alignlib does differently. `index.yaml`
says which objective each recipe is for, the tutorial it belongs to and its place in that
tutorial's order of stages (docs/recipes.md maps every step to its command).

    load_recipes() -> {name: Recipe}, in the index's order
    find_recipe(name) -> the Recipe of that name, or None
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent
INDEX_FILE = RECIPES_DIR / "index.yaml"


@dataclass(frozen=True)
class Recipe:
    """One stage of a tutorial: `alignlib train {objective} --config {name}`."""

    name: str
    objective: str
    tutorial: str  # the tutorial's title
    stage: int  # 1-based, in the tutorial's order; alternatives of one step share a number
    stages: int  # how many steps the tutorial has
    after: str | None  # the recipe whose output this one starts from (None for a first stage)
    first: str | None  # a command to run before this stage (e.g. merging the previous stage's adapter), or None
    does: str  # what the stage does, in a few words
    path: Path


@cache
def load_recipes() -> dict[str, Recipe]:
    """Every recipe of index.yaml, by name, tutorial by tutorial and stage by stage. A recipe the
    index names without its file, or a file the index does not name, is an error (tests check both)."""
    import yaml

    recipes: dict[str, Recipe] = {}
    for tutorial in yaml.safe_load(INDEX_FILE.read_text())["tutorials"]:
        steps = tutorial["recipes"]
        for step in steps:
            name = step["name"]
            recipes[name] = Recipe(name=name, objective=step["objective"], tutorial=tutorial["title"],
                                   stage=step["stage"], stages=max(s["stage"] for s in steps),
                                   after=step.get("after"), first=step.get("first"), does=step["does"],
                                   path=RECIPES_DIR / f"{name}.yaml")
    return recipes


def find_recipe(name: str) -> Recipe | None:
    """The recipe called `name` (a file name without .yaml), or None."""
    return load_recipes().get(name)
