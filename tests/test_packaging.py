"""dfx as an installed package: shipped recipes resolved by name from any folder, `_base_` to shipped
recipes, did-you-mean, `dfx recipes [--copy]`, and a wheel that carries every recipe of recipes/.

Every test runs in its own empty folder (conftest's ``isolated``), as a user outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import run_dfx as dfx  # in-process, through the real entry point

from dfx.errors import UsageError
from dfx.recipe import find_shipped, load_recipe, load_tree, resolve_recipe, shipped_folder

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
CHECKOUT_RECIPES = sorted(p.name for p in RECIPES.glob("*.y*ml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_shipped_folder_is_the_repositorys_recipes_folder():
    # in a checkout the shipped recipes are recipes/ itself: one copy, no second folder to keep in step
    assert shipped_folder().resolve() == RECIPES.resolve()
    assert not (REPO / "dfx" / "recipes").exists()


@pytest.mark.parametrize("form", ["hdetr-shapes", "hdetr-shapes.yaml", "recipes/hdetr-shapes.yaml"])
def test_a_shipped_recipe_by_name_from_an_empty_folder(form):
    assert not Path("recipes").exists()
    assert resolve_recipe(form) == RECIPES / "hdetr-shapes.yaml"
    recipe = load_recipe(form, ["train.epochs=3"])
    assert recipe.name == "hdetr-shapes" and recipe.task == "detection" and recipe.train.epochs == 3
    assert recipe.to_dict() == load_recipe(RECIPES / "hdetr-shapes.yaml", ["train.epochs=3"]).to_dict()


def test_an_existing_path_wins_over_a_shipped_name():
    local = "task: classification\ntrain: {epochs: 7}\n"
    write(Path("hdetr-shapes.yaml"), local)
    write(Path("recipes/dino-shapes.yaml"), local)
    assert load_recipe("hdetr-shapes.yaml").task == "classification"  # the file here
    assert load_recipe("hdetr-shapes").task == "detection"  # no file `hdetr-shapes`: the shipped one
    assert load_recipe("recipes/dino-shapes.yaml").train.epochs == 7
    assert load_recipe("dino-shapes").task == "detection"
    # a path into any other folder never falls back to a shipped recipe
    assert find_shipped("elsewhere/hdetr-shapes.yaml") is None
    with pytest.raises(UsageError, match=r"^recipe file not found: elsewhere/hdetr-shapes\.yaml$"):
        load_recipe("elsewhere/hdetr-shapes.yaml")


def test_base_between_shipped_recipes_and_from_a_users_folder():
    shipped_child = load_recipe("deformable-detr-shapes")  # _base_: hdetr-shapes.yaml, resolved beside it
    hdetr = load_recipe("hdetr-shapes")
    assert hdetr.model.one2many_queries > 0 and shipped_child.model.one2many_queries == 0
    assert shipped_child.train.epochs == hdetr.train.epochs and shipped_child.data.root == hdetr.data.root

    mine = write(Path("experiments/mine/short.yaml"), "_base_: hdetr-shapes.yaml\ntrain: {epochs: 2}\n")
    recipe = load_recipe(mine)
    assert recipe.name == "short" and recipe.train.epochs == 2
    expected = hdetr.to_dict()
    expected["train"]["epochs"] = 2
    assert recipe.to_dict() == expected

    # a user's file beside the recipe comes first, and a chain through a shipped parent keeps going
    write(Path("experiments/mine/hdetr-shapes.yaml"), "_base_: recipes/cls-shapes.yaml\ntrain: {epochs: 5}\n")
    assert load_tree(mine)["task"] == "classification" and load_recipe(mine).train.epochs == 2


def test_unknown_names_exit_2_with_the_close_shipped_names():
    result = dfx("train", "hdetr-shape", "--dry-run", "--json")
    assert result.returncode == 2, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error.startswith("recipe file not found: hdetr-shape, and no shipped recipe is named hdetr-shape")
    assert "(did you mean hdetr-shapes" in error and "`dfx recipes` lists them" in error

    mine = write(Path("mine.yaml"), "_base_: cls-shape.yaml\n")
    with pytest.raises(UsageError, match=r"mine\.yaml: _base_ cls-shape\.yaml: no file .*cls-shape\.yaml, and no "
                                         r"shipped recipe is named cls-shape \(did you mean cls-shapes"):
        load_recipe(mine)


def test_every_command_takes_recipe_names_from_any_folder():
    import dfx as package
    from dfx.compare import parse_variant
    from dfx.data_check import detection_recipe

    result = dfx("train", "cls-shapes", "train.epochs=4", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["train"]["epochs"] == 4
    result = dfx("distill", "--dry-run", "--json")  # bare: the shipped distill-shapes
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["distill"]["teacher"] == "runs/classification/cls-shapes"
    # without the teacher run, the command that makes it is given by name, as it works from here
    result = dfx("distill", "--json")
    assert result.returncode == 2 and "create it with `dfx train cls-shapes`" in json.loads(result.stdout)["error"]

    by_name = package.create_model("cls-shapes", ["model.num_classes=5"])
    by_path = package.create_model(RECIPES / "cls-shapes.yaml", ["model.num_classes=5"])
    assert by_name.state_dict().keys() == by_path.state_dict().keys()
    assert by_name.head.weight.shape == by_path.head.weight.shape == (5, 96)
    assert detection_recipe("hdetr-shapes").name == "hdetr-shapes"
    variant = parse_variant("hdetr-shapes:model.one2many_k=3")
    assert (variant.name, variant.recipe, variant.overrides) == ("hdetr-shapes:one2many_k=3", "hdetr-shapes",
                                                                 ["model.one2many_k=3"])


def test_compare_tells_variants_from_shared_overrides():
    from dfx.cli import _is_override

    assert _is_override("train.epochs=2") and _is_override("data.root=/data/yolo/data.yaml")
    assert not _is_override("hdetr-shapes") and not _is_override("hdetr-shapes:model.one2many_k=3")
    assert not _is_override("recipes/hdetr-shapes.yaml:model.one2many_k=3")


def test_recipes_lists_the_shipped_ones_from_anywhere():
    result = dfx("recipes", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)["recipes"]
    assert [Path(r["path"]).name for r in listed] == CHECKOUT_RECIPES
    assert {r["name"]: r["task"] for r in listed}["distill-shapes"] == "distillation"
    table = dfx("recipes").stdout
    assert "\n hdetr-shapes " in table and str(RECIPES) not in table  # names, which work from here


def test_recipes_copy_writes_one_out_and_keeps_existing_files():
    result = dfx("recipes", "--copy", "deformable-detr-shapes", "mine", "--json")
    assert result.returncode == 0, result.stderr
    copied = Path(json.loads(result.stdout)["copied"])
    assert copied == Path("mine/deformable-detr-shapes.yaml")
    assert copied.read_bytes() == (RECIPES / "deformable-detr-shapes.yaml").read_bytes()  # comments included
    # its `_base_: hdetr-shapes.yaml` is not beside it: the shipped parent is used
    assert load_recipe(copied).to_dict() == load_recipe("deformable-detr-shapes").to_dict()

    copied.write_text("# mine now\n")
    result = dfx("recipes", "--copy", "deformable-detr-shapes", "mine")
    assert result.returncode == 2 and "mine/deformable-detr-shapes.yaml already exists; pass --force" in result.stderr
    assert copied.read_text() == "# mine now\n"
    result = dfx("recipes", "--copy", "deformable-detr-shapes.yaml", "mine", "--force")
    assert result.returncode == 0 and "wrote mine/deformable-detr-shapes.yaml" in result.stdout
    assert copied.read_bytes() == (RECIPES / "deformable-detr-shapes.yaml").read_bytes()

    result = dfx("recipes", "--copy", "cls-shapes", str(copied))
    assert result.returncode == 2 and f"{copied} is a file; pass the folder" in result.stderr
    result = dfx("recipes", "--copy", "cls-shape")  # into the current folder by default
    assert result.returncode == 2 and "no shipped recipe is named cls-shape (did you mean cls-shapes" in result.stderr
    assert dfx("recipes", "--copy", "cls-shapes").returncode == 0 and Path("cls-shapes.yaml").is_file()


def test_the_wheel_carries_every_recipe_and_the_package_data(tmp_path):
    """Built from a copy of the sources (the checkout stays untouched): every file of recipes/ (one
    added after this test was written included), py.typed and the licence are in the wheel."""
    pytest.importorskip("setuptools", minversion="77")  # what pyproject's build-system asks for
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for folder in ("dfx", "recipes"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    write(source / "recipes" / "zz-added-later.yaml", "task: classification\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("dfx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(n.removeprefix("dfx/recipes/") for n in names if n.startswith("dfx/recipes/"))
    assert shipped == sorted([*CHECKOUT_RECIPES, "zz-added-later.yaml"])
    assert "dfx/py.typed" in names and any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("recipes/", "tests/")) for n in names)  # nothing outside the package

    # installed (not editable) and run from an empty folder, dfx reads its recipes from the wheel
    site, empty = tmp_path / "site", tmp_path / "empty"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    listed = subprocess.run([sys.executable, "-m", "dfx", "recipes", "--json"], cwd=empty, env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    paths = [Path(r["path"]) for r in json.loads(listed.stdout)["recipes"]]
    assert {p.parent for p in paths} == {site / "dfx" / "recipes"} and "zz-added-later.yaml" in {p.name for p in paths}
