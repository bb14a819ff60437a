"""The one packaging rule pyproject.toml cannot state: the recipes live at the repository root,
``recipes/`` (where every doc, test and command names them), and the wheel carries that folder as
package data ``dfx/recipes/*.yaml``. Everything else (metadata, package data patterns) is in
pyproject.toml; dfx.recipe.shipped_folder reads the folder in both layouts."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["dfx", "dfx.*"]), "dfx.recipes"], package_dir={"dfx.recipes": "recipes"})
