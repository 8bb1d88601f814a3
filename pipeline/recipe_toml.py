"""A recipe TOML read into a `Recipe`: the teacher, the extraction settings, one `Row` per student run.

The format is in docs/recipes.md; pipeline/recipes.py checks a recipe against the library and runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPE_DIR = HERE / "recipes"


class RecipeError(Exception):
    """The recipe TOML itself is unusable (cannot parse, missing keys)."""


@dataclass
class Row:
    name: str
    student: str  # zoo name or absolute TOML path
    paper: float | None
    preset: str | None = None  # None = plain training (no cache)
    overrides: list[str] = field(default_factory=list)
    imagenet: str | None = None


@dataclass
class Recipe:
    name: str
    path: Path
    description: str
    data_format: str
    metric: str
    teacher: str
    teacher_paper: float | None
    lr_batch32: float
    epochs: float
    extract: dict
    eval_split: str
    rows: list[Row]


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml":
        return path
    return RECIPE_DIR / f"{name_or_path}.toml"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def model_ref(value: str) -> str:
    """A zoo name stays a name; a TOML path (relative to the repository) becomes absolute."""
    if value.endswith(".toml"):
        path = Path(value)
        return str(path if path.is_absolute() else REPO / path)
    return value


def _need(table: dict, key: str, kind, where: str):
    if key not in table:
        raise RecipeError(f"{where}: missing key {key!r}")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool):  # TOML true is not a number
        raise RecipeError(f"{where}: {key} = {value!r} has the wrong type")
    return value


def load_recipe(name_or_path: str) -> Recipe:
    from defeat_cache.data.dataset import read_toml
    from defeat_cache.errors import UserError

    path = recipe_path(name_or_path)
    if not path.is_file():
        raise RecipeError(f"recipe {name_or_path!r} not found ({path}); available: {', '.join(list_recipes())}")
    try:
        cfg = read_toml(path, "recipe")
    except UserError as e:
        raise RecipeError(str(e)) from None
    where = str(path)
    rows = []
    for i, r in enumerate(cfg.get("rows", [])):
        row_where = f"{where} [[rows]] #{i + 1}"
        overrides = r.get("set", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise RecipeError(f"{row_where}: set must be a list of \"section.key=value\" strings")
        paper = r.get("paper")
        if paper is not None and not isinstance(paper, (int, float)):
            raise RecipeError(f"{row_where}: paper = {paper!r} must be a number")
        rows.append(Row(name=_need(r, "name", str, row_where),
                        student=model_ref(_need(r, "student", str, row_where)),
                        paper=paper,
                        preset=r.get("preset"),
                        overrides=overrides,
                        imagenet=r.get("imagenet")))
    if not rows:
        raise RecipeError(f"{where}: no [[rows]]")
    extract = cfg.get("extract", {})
    return Recipe(
        name=path.stem,
        path=path,
        description=cfg.get("description", path.stem),
        data_format=cfg.get("data_format", "coco"),
        metric=cfg.get("metric", "AP"),
        teacher=model_ref(_need(cfg, "teacher", str, where)),
        teacher_paper=cfg.get("teacher_paper"),
        lr_batch32=float(_need(cfg, "lr_batch32", (int, float), where)),
        epochs=float(cfg.get("epochs", 12)),
        extract={"split": extract.get("split", "train"), "views": extract.get("views", "orig,hflip"),
                 "codec": extract.get("codec", "fp16"), "proposals": extract.get("proposals"),
                 "backbone": bool(extract.get("backbone", False))},
        eval_split=cfg.get("eval", {}).get("split", "val"),
        rows=rows,
    )
