"""`cessl compare` without running it: the grid, the aggregation of hand-made cells (mean +- std,
missing values, pairing check), the files, and the compiled cessl-compare pipeline (one
ParallelFor over the cells, the GPU request on the fine-tune inside it)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.compare import (
    COLUMNS,
    CellResult,
    CompareGrid,
    check_paired,
    comparison_table,
    format_value,
    memory_heading,
    read_cells,
    table_markdown,
    table_rows,
    write_comparison,
)
from pipeline import cli
from pipeline.cli.compare import base_params
from pipeline.dags.compare import EXCLUDED_PARAMS, CompareSettings
from pipeline.dags.finetune import CompileOptions, Toleration
from pipeline.dags.spec import compare_spec, compile_spec


def cell(method: str, ratio: float, seed: int, f_beta: float, **changes) -> CellResult:
    values = {
        "method": method,
        "labelled_ratio": ratio,
        "seed": seed,
        "metrics": {"macro_f_beta": f_beta, "macro_auroc": 0.5 + f_beta / 2, "macro_map": f_beta / 2},
        "ms_per_step": 100.0 + seed,
        "peak_memory_mb": 50.0 * (seed + 1),
        "memory_measure": "cpu peak RSS growth",
        "trainable_params": 1000 if method == "cessl" else 9000,
        "total_params": 9000,
        "steps": 10,
        "split_fingerprint": f"split-{ratio}-{seed}",
        "test_split_hash": "the-test-split",  # one test split for every cell
    }
    return CellResult(**(values | changes))


CELLS = [
    cell("cessl", 0.05, 0, 0.40),
    cell("cessl", 0.05, 1, 0.50),
    cell("cessl", 0.05, 2, 0.45),
    cell("fixmatch", 0.05, 0, 0.30),
    cell("fixmatch", 0.05, 1, 0.20),
    cell("fixmatch", 0.05, 2, 0.25),
    cell("cessl", 0.15, 0, 0.60),
    cell("fixmatch", 0.15, 0, 0.55),
]


def test_grid_cells_share_splits_across_methods_and_validate():
    grid = CompareGrid.parse("cessl, fixmatch", "0.05,0.15", "0,1")
    cells = grid.cells()
    assert len(cells) == 8 and cells[0].item() == {"method": "cessl", "labelled_ratio": 0.05, "seed": 0, "test_seed": 0}
    assert {c.test_seed for c in cells} == {0}  # every cell draws the test cut with the grid's first seed
    assert [c.method for c in cells[:2]] == ["cessl", "fixmatch"]  # one split, both methods, next to each other
    assert CompareGrid.from_items(grid.items()) == grid
    with pytest.raises(ValueError, match="unknown method"):
        CompareGrid.parse("cessl,bogus", "0.05", "0")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        CompareGrid.parse("cessl", "1.5", "0")
    with pytest.raises(ValueError, match="repeated"):
        CompareGrid.parse("cessl", "0.05", "0,0")
    with pytest.raises(ValueError, match="at least one"):
        CompareGrid.parse("", "0.05", "0")


def test_table_is_mean_and_sample_std_over_seeds_per_method_and_ratio():
    table = comparison_table(CELLS)
    assert list(zip(table["method"], table["labelled_ratio"], strict=True)) == [
        ("cessl", 0.05),
        ("fixmatch", 0.05),
        ("cessl", 0.15),
        ("fixmatch", 0.15),
    ]
    row = table.iloc[0]
    assert row["n_seeds"] == 3
    assert row["macro_f_beta_mean"] == pytest.approx(0.45)
    assert row["macro_f_beta_std"] == pytest.approx(statistics.stdev([0.40, 0.50, 0.45]))
    assert row["ms_per_step_mean"] == pytest.approx(101.0) and row["peak_memory_mb_mean"] == pytest.approx(100.0)
    assert row["trainable_params_mean"] == 1000 and row["trainable_params_std"] == 0
    assert row["memory_measure"] == "cpu peak RSS growth"
    single = table.iloc[2]  # one seed: the std is undefined, not 0
    assert single["n_seeds"] == 1 and single["macro_f_beta_mean"] == pytest.approx(0.60)
    assert math.isnan(single["macro_f_beta_std"])
    # No cell computed the Challenge score: n/a, counted as 0 seeds.
    assert math.isnan(row["challenge_score_mean"]) and row["n_challenge_score"] == 0


def test_a_missing_metric_is_left_out_of_its_mean():
    cells = [cell("cessl", 0.05, 0, 0.4), cell("cessl", 0.05, 1, 0.6), cell("cessl", 0.05, 2, 0.5)]
    del cells[1].metrics["macro_auroc"]  # e.g. undefined on that test split
    row = comparison_table(cells).iloc[0]
    assert row["n_macro_auroc"] == 2 and row["macro_auroc_mean"] == pytest.approx((0.7 + 0.75) / 2)
    assert row["n_macro_f_beta"] == 3


def test_the_head_only_row_reads_labelled_records_and_has_no_step_to_time():
    """The head-only baseline takes no gradient step: its ms/step and peak memory are n/a (the
    finetune step measures none), its trainable share is its head's, and it reads labelled records."""
    nothing = {"ms_per_step": math.nan, "peak_memory_mb": math.nan, "steps": 0, "trainable_params": 450}
    cells = [cell("cessl", 0.05, s, 0.4 + s / 10, reads_unlabelled=True) for s in (0, 1)]
    cells += [cell("head-only", 0.05, s, 0.3 + s / 10, **nothing) for s in (0, 1)]
    table = comparison_table(cells)
    headings, rows = table_rows(table)
    head_only = dict(zip(headings, rows[1], strict=True))
    assert head_only["method"] == "head-only" and head_only["reads"] == "labelled"
    assert head_only["ms/step"] == "n/a" and head_only[memory_heading(table)] == "n/a"
    assert head_only["trainable"] == "450" and head_only["trainable share"] == "5%"
    assert dict(zip(headings, rows[0], strict=True))["reads"] == "labelled + unlabelled"


def test_methods_must_share_the_split_of_a_ratio_and_seed():
    check_paired(CELLS)
    with pytest.raises(ValueError, match="different splits"):
        check_paired([*CELLS, cell("lora", 0.05, 0, 0.3, split_fingerprint="other")])
    with pytest.raises(ValueError, match="2 different test splits"):
        check_paired([*CELLS, cell("lora", 0.05, 0, 0.3, test_split_hash="another")])


def test_formatting_and_markdown():
    assert format_value(0.51234, 0.01234, "macro_f_beta") == "0.512 +- 0.012"
    assert format_value(0.5, math.nan, "macro_f_beta") == "0.500"
    assert format_value(math.nan, math.nan, "macro_map") == "n/a"
    assert format_value(101.26, 1.0, "ms_per_step") == "101.3 +- 1.0"
    assert format_value(1234.0, 0.0, "trainable_params") == "1,234"
    text = table_markdown(comparison_table(CELLS))
    assert "| cessl | 5% | 3 | 0.450 +- 0.050 | n/a |" in text  # F-beta2, then G-beta2 (not in these cells)
    assert "| 11.1% | labelled |" in text and "trainable share | reads |" in text
    assert "peak MB (cpu peak RSS growth)" in text
    assert text.count("\n| ") == 1 + 4  # heading + one row per (method, ratio)


def test_write_comparison_files_round_trip(tmp_path):
    files = write_comparison(CELLS, tmp_path / "out")
    assert set(files.artifacts()) == {
        "comparison/comparison.csv",
        "comparison/comparison.md",
        "comparison/comparison.png",
        "comparison/cells.json",
    }
    assert files.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(files.csv)
    assert {f"{c}_mean" for c in COLUMNS} | {f"{c}_std" for c in COLUMNS} <= set(csv.columns)
    assert read_cells(files.cells) == CELLS
    assert CellResult.from_json(CELLS[0].to_json()) == CELLS[0]


# --------------------------------------------------------------------------- compiled


IMAGE = "registry.example.org/cessl:1.2.3"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, dict]:
    path = tmp_path_factory.mktemp("compare") / "compare.yaml"
    options = CompileOptions(
        image=IMAGE,
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=(Toleration.parse("nvidia.com/gpu:NoSchedule"),),
    )
    grid = CompareGrid(("cessl", "fixmatch"), (0.05, 0.15), (0, 1, 2))
    docs = list(
        yaml.safe_load_all(compile_spec(compare_spec(CompareSettings(grid, parallelism=4)), path, options).read_text())
    )
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compiled_comparison_loops_over_the_grid(compiled):
    spec, _ = compiled
    assert spec["pipelineInfo"]["name"] == "cessl-compare"
    tasks = spec["root"]["dag"]["tasks"]
    loops = [t for t in tasks.values() if "parameterIterator" in t]
    assert len(loops) == 1
    loop = loops[0]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--grid"
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"split", "allocate-ranks", "finetune", "evaluate", "log-cell"}
    assert {"ingest", "preprocess", "resolve-backbone", "start-comparison", "summarize-comparison"} <= set(tasks)
    collected = tasks["summarize-comparison"]["inputs"]["parameters"]["cells"]["taskOutputParameter"]
    assert collected["producerTask"] == loop["taskInfo"]["name"]
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert len(parameters["grid"]["defaultValue"]) == 12 and parameters["epochs"]["defaultValue"] == 200
    assert not set(EXCLUDED_PARAMS) & set(parameters)
    assert "register" not in tasks and "exec-register" not in spec["deploymentSpec"]["executors"]


def test_compiled_comparison_requests_a_gpu_on_every_finetune(compiled):
    spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    resources = executors["exec-finetune"]["container"]["resources"]
    assert (
        resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        and resources["accelerator"]["resourceCount"] == "1"
    )
    assert platform["exec-finetune"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    for name, executor in executors.items():
        assert executor["container"]["image"] == IMAGE
        if name != "exec-finetune":
            assert "accelerator" not in executor["container"].get("resources", {}), name
    assert "secretAsEnv" in platform["exec-log-cell"] and "secretAsEnv" in platform["exec-start-comparison"]


def test_compare_cli_compiles_with_the_cluster_defaults(tmp_path):
    out = tmp_path / "compare.yaml"
    argv = ["compare", "--methods", "cessl,lora", "--ratios", "0.05", "--seeds", "0,1", "--compile", "-o", str(out)]
    assert cli.main(argv) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert (
        parameters["epochs"]["defaultValue"] == 200 and parameters["experiment_name"]["defaultValue"] == "cessl-compare"
    )
    assert [c["method"] for c in parameters["grid"]["defaultValue"]] == ["cessl", "lora", "cessl", "lora"]
    assert base_params(compile_only=False).epochs == 0, "the local comparison runs the demo's quick schedule"
    assert Path(out).stat().st_size > 0


# --------------------------------------------------------------------------- cost measurement


def test_step_profiler_times_steps_without_warmup_or_validations():
    import time

    from ml.train.callbacks import CPU_MEMORY, StepProfiler

    profiler = StepProfiler("cpu", warmup=1)
    assert math.isnan(profiler.ms_per_step) and math.isnan(profiler.peak_memory_mb)
    profiler.on_validation(0, {})
    time.sleep(0.2)
    profiler.on_step(1, {})  # warm-up: not timed
    time.sleep(0.02)
    profiler.on_step(2, {})
    time.sleep(0.3)  # a validation: not timed
    profiler.on_validation(2, {})
    time.sleep(0.02)
    profiler.on_step(3, {})
    assert profiler.steps == 2
    assert 15 <= profiler.ms_per_step < 150
    summary = profiler.summary()
    assert summary["memory_measure"] == CPU_MEMORY and summary["peak_memory_mb"] >= 0


def _predictions(tmp_path, name: str, labels: np.ndarray, flip: float, seed: int):
    """A cell's predictions.npz: the labels with a fraction ``flip`` of entries wrong."""
    from components.compare import CellPredictions
    from components.evaluate import save_predictions

    rng = np.random.default_rng(seed)
    wrong = rng.random(labels.shape) < flip
    probs = np.where(wrong, 1 - labels, labels).astype(float)
    ids = [f"r{i:03d}" for i in range(len(labels))][::-1]  # any order: paired by id
    path = save_predictions(tmp_path / f"{name}.npz", ids, probs[::-1], labels[::-1], np.full(labels.shape[1], 0.5))
    return CellPredictions.load(path)


def test_paired_differences_against_cessl_on_the_same_records(tmp_path):
    from components.compare import paired_differences

    labels = np.random.default_rng(0).integers(0, 2, size=(80, 4))
    results = [cell(m, 0.05, s, 0.5) for m in ("cessl", "lora") for s in (0, 1)]
    predictions = {
        r.cell.name: _predictions(tmp_path, r.cell.name, labels, 0.05 if r.method == "cessl" else 0.3, r.seed)
        for r in results
    }
    (row,) = paired_differences(results, predictions).to_dict("records")
    assert (row["method"], row["reference"], row["n_seeds"], row["n_records"]) == ("lora", "cessl", 2, 80)
    for metric in ("macro_f_beta", "macro_g_beta"):  # lora is clearly worse here: the interval says so
        assert row[f"{metric}_low"] < row[metric] < row[f"{metric}_high"] < 0
    files = write_comparison(results, tmp_path / "out", predictions)
    assert "comparison/paired.csv" in files.artifacts()
    assert "## Paired differences against cessl" in files.markdown.read_text()
    other = dict(predictions)
    other["lora-0.05-s1"] = _predictions(tmp_path, "x", labels[:60], 0.3, 1)  # another test split
    with pytest.raises(ValueError, match="not tested on the same records"):
        paired_differences(results, other)
