"""Recipes: `_base_` inheritance, overrides, validation errors."""

from __future__ import annotations

import pytest

from dfx.errors import UsageError
from dfx.recipe import deep_merge, load_recipe, parse_override


def write(path, text):
    path.write_text(text)
    return path


def test_base_inheritance_deep_merges_and_child_wins(tmp_path):
    write(tmp_path / "base.yaml", "task: classification\ntrain: {epochs: 5, lr: 0.1, milestones: [1, 2]}\n"
                                  "model: {kwargs: {depth: 2, embed_dim: 32}}\n")
    write(tmp_path / "mid.yaml", "_base_: base.yaml\ntrain: {lr: 0.01}\nmodel: {kwargs: {depth: 4}}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    child = write(sub / "child.yaml", "_base_: [../mid.yaml]\ntrain: {milestones: [3]}\n")
    recipe = load_recipe(child)
    assert recipe.train.epochs == 5  # from base
    assert recipe.train.lr == 0.01  # mid overrides base
    assert recipe.train.milestones == [3]  # lists replace, not concatenate
    assert recipe.model.kwargs == {"depth": 4, "embed_dim": 32}  # mappings merge key by key
    assert recipe.name == "child"


def test_overrides_parse_yaml_values_and_apply_last(tmp_path):
    path = write(tmp_path / "r.yaml", "task: classification\ntrain: {epochs: 5}\n")
    recipe = load_recipe(path, ["train.epochs=7", "train.lr=1e-4", "train.grad_clip=null", "model.kwargs.depth=3",
                                "data.scale=[0.5, 1.0]", "train.amp=bf16"])
    assert recipe.train.epochs == 7
    assert recipe.train.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; float fields accept it
    assert recipe.train.grad_clip is None
    assert recipe.model.kwargs == {"depth": 3}
    assert recipe.data.scale == [0.5, 1.0]
    assert recipe.train.amp == "bf16"
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path / "r.yaml", "task: classification\ntrain: {epochz: 5}\n")
    with pytest.raises(UsageError, match=r"train\.epochz \(did you mean epochs\?\)"):
        load_recipe(path)
    with pytest.raises(UsageError, match=r"did you mean batch_size"):
        load_recipe(write(tmp_path / "o.yaml", "task: classification\n"), ["train.bach_size=3"])
    with pytest.raises(UsageError, match=r"unknown recipe section 'trian' \(did you mean train\?\)"):
        load_recipe(write(tmp_path / "s.yaml", "task: classification\ntrian: {}\n"))
    with pytest.raises(UsageError, match=r"unknown task 'clasification' \(did you mean classification\?\)"):
        load_recipe(write(tmp_path / "t.yaml", "task: clasification\n"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=ten", r"train\.epochs: expected int, got 'ten'"),
        ("train.epochs=2.5", r"train\.epochs: expected int, got 2\.5"),
        ("train.ema=3", r"train\.ema: expected bool, got 3"),
        ("train.optimizer=adamx", r"train\.optimizer: expected one of 'adamw', 'sgd', got 'adamx'"),
        ("train.milestones=[1, x]", r"train\.milestones: expected a list of int"),
        ("model.kwargs=5", r"model\.kwargs: expected a mapping, got 5"),
        ("data.scale=[0.9, 0.5]", r"data\.scale: expected \[min, max\]"),
        # values out of range, caught before any work
        ("train.epochs=0", r"train\.epochs: 0 is out of range; expected a value in \[1, 100000\]"),
        ("train.epochs=1000000", r"train\.epochs: 1000000 is out of range"),
        ("eval.every=0", r"eval\.every: 0 is out of range; expected a value in \[1, 100000\]"),
        ("train.batch_size=0", r"train\.batch_size: 0 is out of range; expected a value in \[1, 1048576\]"),
        ("train.num_workers=-1", r"train\.num_workers: -1 is out of range; expected a value in \[0, 256\]"),
        ("train.lr=.nan", r"train\.lr: expected a finite number, got nan"),
        ("train.lr=0", r"train\.lr: 0\.0 is out of range; expected a value > 0"),
        ("train.weight_decay=-.inf", r"train\.weight_decay: expected a finite number, got -inf"),
        ("train.seed=4294967296", r"train\.seed: 4294967296 is out of range; expected a value in \[0, 4294967296\)"),
        ("train.seed=-1", r"train\.seed: -1 is out of range"),
        ("train.ema_decay=1.5", r"train\.ema_decay: 1\.5 is out of range; expected a value in \[0, 1\]"),
        ("train.milestones=[3, 0]", r"train\.milestones\[1\]: 0 is out of range"),
        ("train.grad_clip=-1", r"train\.grad_clip: -1\.0 is out of range; expected a value > 0"),
    ],
)
def test_wrong_types_and_ranges_name_the_key_value_and_expectation(tmp_path, override, message):
    path = write(tmp_path / "r.yaml", "task: classification\n")
    with pytest.raises(UsageError, match=message):
        load_recipe(path, [override])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "task: classification\ntrain:\n  epochs: [1, 2\n  lr: 3\n")
    with pytest.raises(UsageError, match=r"bad\.yaml:\d+:\d+: YAML syntax error"):
        load_recipe(path)


def test_missing_file_base_cycle_and_non_mapping(tmp_path):
    with pytest.raises(UsageError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(UsageError, match="_base_ cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(UsageError, match="must be a YAML mapping"):
        load_recipe(write(tmp_path / "l.yaml", "- 1\n- 2\n"))
    with pytest.raises(UsageError, match="not of the form"):
        load_recipe(write(tmp_path / "ok.yaml", "task: classification\n"), ["train.epochs"])


def test_recipes_are_data_only(tmp_path):
    # a Python tag is rejected by the safe loader instead of being executed
    path = write(tmp_path / "evil.yaml", "task: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(UsageError, match="YAML"):
        load_recipe(path)


def test_deep_merge_does_not_mutate_inputs():
    base = {"a": {"b": 1, "c": [1]}}
    top = {"a": {"b": 2}}
    merged = deep_merge(base, top)
    assert merged == {"a": {"b": 2, "c": [1]}} and base == {"a": {"b": 1, "c": [1]}}


def test_shipped_recipes_resolve():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.train.epochs > 0


def test_range_edges_are_accepted(tmp_path):
    path = write(tmp_path / "r.yaml", "task: classification\n")
    recipe = load_recipe(path, ["train.seed=4294967295", "train.epochs=1", "eval.every=1", "train.num_workers=0",
                                "train.momentum=0", "train.ema_decay=1", "train.grad_clip=null"])
    assert recipe.train.seed == 2**32 - 1 and recipe.train.grad_clip is None
