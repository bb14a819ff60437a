"""dfx compare: variant parsing, paired statistics against scipy, and a real multi-seed comparison."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from scipy import stats

from dfx.cli import parse_seeds
from dfx.compare import Variant, compare, paired_difference, parse_variant, read_variants, reading_line, tabulate
from dfx.errors import RunError, UsageError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_variant_specs_name_recipe_and_overrides():
    v = parse_variant("recipes/hdetr-shapes.yaml:model.one2many_k=3:train.lr=0.5e-3")
    assert v == Variant("hdetr-shapes:one2many_k=3:lr=0.5e-3", "recipes/hdetr-shapes.yaml",
                        ["model.one2many_k=3", "train.lr=0.5e-3"])
    assert parse_variant("a/b.yml") == Variant("b", "a/b.yml", [])
    with pytest.raises(UsageError, match="not an override key=value"):
        parse_variant("recipes/a.yaml:model.k")


def test_variant_list_file_and_duplicate_names(tmp_path):
    listing = tmp_path / "variants.yaml"
    listing.write_text(textwrap.dedent(f"""\
        - name: baseline
          recipe: {RECIPES / 'cls-shapes.yaml'}
        - recipe: {RECIPES / 'cls-shapes.yaml'}
          overrides: [train.lr=0.002]
        """))
    variants = read_variants([str(listing)])
    assert [v.name for v in variants] == ["baseline", "cls-shapes:lr=0.002"]
    assert variants[1].overrides == ["train.lr=0.002"]
    with pytest.raises(UsageError, match="named twice: cls-shapes"):
        read_variants([str(RECIPES / "cls-shapes.yaml")] * 2)


def test_seeds_accept_lists_and_ranges():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    with pytest.raises(UsageError, match="'x' is not a seed"):
        parse_seeds("1,x")


def test_paired_interval_equals_scipys_paired_t_test():
    a = {0: 0.40, 1: 0.43, 2: 0.38, 3: 0.45, 4: 0.41, 5: 0.44}
    b = {0: 0.42, 1: 0.47, 2: 0.39, 3: 0.49, 4: 0.40, 5: 0.47, 9: 0.99}  # seed 9 has no pair: ignored
    diff = paired_difference(a, b)
    seeds = sorted(a)
    reference = stats.ttest_rel([b[s] for s in seeds], [a[s] for s in seeds]).confidence_interval(0.95)
    assert diff["n"] == 6 and diff["seeds"] == seeds
    assert diff["mean"] == pytest.approx(sum(b[s] - a[s] for s in seeds) / 6)
    assert (diff["low"], diff["high"]) == pytest.approx((reference.low, reference.high))
    assert diff["reading"] == "better"  # the whole interval is above 0
    assert paired_difference(b, a)["reading"] == "worse"
    assert paired_difference(b, a, mode="min")["reading"] == "better"  # lower is better for a loss
    noisy = paired_difference({0: 0.4, 1: 0.5, 2: 0.4}, {0: 0.5, 1: 0.4, 2: 0.45})
    assert noisy["low"] < 0 < noisy["high"] and noisy["reading"] == "no clear difference"
    line = reading_line("B", "A", diff, "AP")
    assert line == f"B − A = {100 * diff['mean']:+.1f} AP [{100 * diff['low']:.1f}, {100 * diff['high']:.1f}], 6 seeds: better"


def test_table_counts_failed_runs_apart():
    variants = [Variant("a", "a.yaml"), Variant("b", "b.yaml")]
    runs = [{"variant": "a", "seed": s, "status": "done", "metrics": {"AP": 0.3 + s / 100}, "wall_s": 10.0}
            for s in range(3)]
    runs += [{"variant": "b", "seed": 0, "status": "done", "metrics": {"AP": 0.35}, "wall_s": 12.0},
             {"variant": "b", "seed": 1, "status": "failed", "reason": "boom", "wall_s": 1.0},
             {"variant": "b", "seed": 2, "status": "done", "metrics": {"AP": 0.36}, "wall_s": 14.0}]
    rows = tabulate(variants, runs, "AP", "max")
    assert rows[0]["metric"]["n"] == 3 and rows[0]["metric"]["mean"] == pytest.approx(0.31)
    assert rows[1]["metric"]["n"] == 2 and rows[1]["wall_s"] == pytest.approx(13.0)
    assert rows[1]["failed"] == [{"seed": 1, "reason": "boom"}]
    assert rows[1]["vs_first"]["seeds"] == [0, 2]
    assert rows[1]["vs_first"]["mean"] == pytest.approx(((0.35 - 0.30) + (0.36 - 0.32)) / 2)


def test_variants_of_different_tasks_are_refused_before_training(tmp_path):
    with pytest.raises(UsageError, match="share one task and eval.metric.*cls-shapes: task classification.*"
                                         "segmenter-shapes: task segmentation"):
        compare([str(RECIPES / "cls-shapes.yaml"), str(RECIPES / "segmenter-shapes.yaml")], out=tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_comparison_trains_every_seed_reports_failures_and_resumes(tiny_recipe, tmp_path):
    variants = [str(tiny_recipe), f"{tiny_recipe}:data.root=/nonexistent"]
    lines: list[str] = []
    # a variant none of whose runs finished makes the comparison a failed run (exit 1), with its report written
    with pytest.raises(RunError, match=r"every run of tiny:root=/nonexistent failed \(seed 0: data.root: /nonexistent"):
        compare(variants, ["train.epochs=1"], seeds=[0, 1], jobs=2, out=tmp_path / "cmp", log=lines.append)
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["tiny"]["metric"]["n"] == 2
    assert [f["seed"] for f in rows["tiny:root=/nonexistent"]["failed"]] == [0, 1]
    assert "/nonexistent" in rows["tiny:root=/nonexistent"]["failed"][0]["reason"]
    # each seed's metric is that of a plain `dfx train` run with that seed
    for run in report["runs"]:
        if run["status"] == "done":
            recorded = [json.loads(line) for line in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
            assert run["metrics"]["top1"] == pytest.approx(recorded[-1]["val/top1"])
            assert f"seed: {run['seed']}" in (Path(run["run_dir"]) / "recipe.yaml").read_text()
    assert {"params_m", "gflops", "latency_ms"} <= set(rows["tiny"])
    for name in ("compare.json", "compare.csv", "compare.md", "compare.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    assert len((tmp_path / "cmp" / "compare.csv").read_text().splitlines()) == 1 + 4
    # a second call trains nothing again: finished runs keep their files untouched
    marker = Path(rows["tiny"]["per_seed"] and report["runs"][0]["run_dir"]) / "metrics.jsonl"
    before = marker.stat().st_mtime_ns
    with pytest.raises(RunError, match="every run of tiny:root=/nonexistent failed"):
        compare(variants, ["train.epochs=1"], seeds=[0, 1], jobs=2, out=tmp_path / "cmp")
    again = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert marker.stat().st_mtime_ns == before
    assert again["rows"][0]["per_seed"] == rows["tiny"]["per_seed"]
    with pytest.raises(UsageError, match="holds a comparison of other variants"):
        compare(variants, ["train.epochs=1"], seeds=[0, 1, 2], out=tmp_path / "cmp")


def test_mask_ap_is_in_points_and_beside_box_ap():
    """Runs with masks report segm/AP: scaled to points like AP, as the main metric or as a column beside AP."""
    from dfx.compare import format_metric, markdown, scale_of, sub_metrics

    assert scale_of("segm/AP") == scale_of("AP") == 100.0 and scale_of("AbsRel") == scale_of("segm") == 1.0
    assert format_metric(0.4567, "segm/AP") == "45.7"
    variants = [Variant("a", "a.yaml"), Variant("b", "b.yaml")]
    runs = [{"variant": v, "seed": s, "status": "done", "wall_s": 1.0,
             "metrics": {"AP": 0.5 + s / 100 + (v == "b") / 10, "segm/AP": 0.4 + s / 50}}
            for v in ("a", "b") for s in range(3)]
    rows = tabulate(variants, runs, "AP", "max")
    report = {"metric": "AP", "mode": "max", "rows": rows, "seeds": [0, 1, 2]}
    assert sub_metrics(report) == ["segm/AP"]
    assert rows[0]["metrics_mean"]["segm/AP"] == pytest.approx(0.42)
    table = markdown(report)
    assert "segm/AP" in table and "42.0" in table
    masks = tabulate(variants, runs, "segm/AP", "max")
    assert masks[1]["vs_first"]["mean"] == pytest.approx(0.0) and masks[0]["metric"]["mean"] == pytest.approx(0.42)
