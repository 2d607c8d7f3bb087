"""The benchmarks run end to end (smallest settings) and report consistent figures.

Timings are not asserted (machine noise); what is asserted is what the figures must satisfy
whatever the machine: every method measured, the reference's ratio is 1, trainable and
stored sizes follow the methods, merged and unmerged logits agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# each bench runs in a subprocess allowed 600 s (subprocess.run below)
pytestmark = pytest.mark.timeout(660)


def run_bench(script: str, args: list[str], out: Path) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / script),
        "--config",
        "tinylight",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--json",
        str(out),
        *args,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_train_step_bench_reports_every_method_and_puts_bf16_next_to_fp32(tmp_path: Path) -> None:
    """One run of the benchmark, both precisions: every method in fp32, CE-SSL and FixMatch in bf16."""
    args = ["--batch", "2", "--steps", "1", "--rounds", "1", "--pairs", "2", "--warmup", "1"]
    summary = run_bench("train_step.py", [*args, "--precisions", "fp32", "bf16"], tmp_path / "train_step.json")
    results = {r["method"]: r for r in summary["results"]}
    fp32, bf16 = (
        ["cessl", "cessl-no-deact", "lora", "full", "fixmatch"],
        ["cessl@bf16", "cessl-no-deact@bf16", "fixmatch@bf16"],
    )
    assert list(results) == [*fp32, *bf16]
    assert results["fixmatch"]["x_fixmatch"] == 1.0
    assert all(r["step_ms"] > 0 and r["peak_mb"] > 0 for r in results.values())
    # CE-SSL trains the allocated (lower) ranks: fewer parameters than uniform LoRA r = 16,
    # far fewer than full fine-tuning, and stores an adapter, not the model
    assert results["cessl"]["trainable"] < results["lora"]["trainable"] < results["full"]["trainable"]
    assert results["full"]["trainable"] == results["full"]["total"] == summary["backbone_params"]
    assert results["cessl"]["stored_bytes"] < results["full"]["stored_bytes"]
    assert len(summary["deactivation_pair_ms"]) == 2
    assert summary["targets"][0]["target"].startswith("CE-SSL step")
    assert any(r < 16 for r in summary["rank_map"].values())
    # the same model in either precision: the same trainable and stored sizes
    assert {r["precision"] for r in results.values()} == {"fp32", "bf16"}
    for name in ("cessl", "cessl-no-deact", "fixmatch"):
        assert results[f"{name}@bf16"]["trainable"] == results[name]["trainable"]
    assert set(summary["deactivation_pair_ms_by_precision"]) == {"fp32", "bf16"}
    loader = {row["variant"]: row for row in summary["loader"]}
    assert set(loader) == {"cessl", "cessl@bf16"}
    assert all(row["loader_ms"] > 0 and 0 <= row["loader_share"] < 1 for row in loader.values())
    targets = [t["target"] for t in summary["targets"]]
    assert any(t.startswith("bf16 CE-SSL step <= 0.35") for t in targets)


@pytest.mark.slow
def test_inference_bench_merged_equals_unmerged(tmp_path: Path) -> None:
    summary = run_bench("inference.py", ["--batch", "2", "--rounds", "2"], tmp_path / "inference.json")
    assert set(summary["median_ms"]) == {"backbone", "merged", "unmerged"}
    assert summary["max_abs_logit_diff_merged_vs_unmerged"] < 1e-5
    assert summary["ratio_merged_to_backbone"] > 0


@pytest.mark.slow
def test_encoder_layout_bench_times_both_layouts(tmp_path: Path) -> None:
    summary = run_bench(
        "encoder_layout.py", ["--batch", "2", "--steps", "1", "--rounds", "2"], tmp_path / "encoder_layout.json"
    )
    figures = summary["figures"]["tinylight"]
    assert list(figures) == ["cessl", "fixmatch", "full"]
    for f in figures.values():
        assert f["nhwc_ms"] > 0 and f["nchw_ms"] > 0
        assert f["nhwc_over_nchw"] == pytest.approx(f["nhwc_ms"] / f["nchw_ms"])


@pytest.mark.slow
def test_serve_bench_reports_memory_throughput_and_switch_cost(tmp_path: Path) -> None:
    summary = run_bench(
        "serve.py",
        [
            *("--sites", "3", "--batch", "1", "--rounds", "1", "--switches", "20", "--big-batch", "4"),
            *("--mixed-sites", "1,3,5", "--mixed-batch", "4", "--mixed-rounds", "1"),
        ],
        tmp_path / "serve.json",
    )
    assert set(summary["memory"]) == {"bank-1", "bank-all", "multi-all", "merged-all"}
    # what holds whatever the machine: more sites hold more tensors, merged models hold the most
    memory = {k: v["tensor_mb"] for k, v in summary["memory"].items()}
    assert memory["bank-1"] < memory["bank-all"] < memory["multi-all"] < memory["merged-all"]
    # mixed batches (5 sites per batch is more than there are): the one pass equals each site's merged model
    assert set(summary["mixed"]) == {"1", "3"} and all(
        f["max_abs_prob_diff_vs_merged"] < 1e-5 and f["multi_records_per_s"] > 0 for f in summary["mixed"].values()
    )
    assert summary["ratios"]["rss_adapters_all_to_1"] > 0
    timing = summary["time"]
    assert timing["max_abs_prob_diff_vs_own_predictor"] < 1e-5
    assert 0 < timing["switch_ms_p50"] <= timing["switch_ms_p99"]
    assert timing["single_site_records_per_s"] > 0 and timing["spread_records_per_s"] > 0


@pytest.mark.slow
def test_pretrain_bench_measures_scaling_communication_and_projects(tmp_path: Path) -> None:
    """bench/pretrain.py: samples/s of every set-up, the all-reduce volume of a DDP step
    (exactly the model's gradients + the global BatchNorm statistics), its share of the step,
    and the ring all-reduce projection to N nodes."""
    import torch

    from ml.model.backbone import ECGTransformer, backbone_config

    out = tmp_path / "pretrain.json"
    cmd = [sys.executable, str(ROOT / "bench" / "pretrain.py"), "--config", "tinylight", "--global-batch", "4"]
    cmd += ["--steps", "2", "--warmup", "1", "--repeat", "1", "--bandwidth-gbps", "10", "--json", str(out)]
    proc = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    summary = json.loads(out.read_text())
    for name in ("single", "single_1thread", "local_1thread", "ddp"):
        assert summary[name][0]["samples_per_s"] > 0, name
    assert summary["ddp"][0]["world_size"] == 2 and summary["local_batch"] == 2
    assert summary["ratio"] == pytest.approx(summary["ddp"][0]["samples_per_s"] / summary["single"][0]["samples_per_s"])

    model = ECGTransformer(backbone_config("tinylight", 6))
    params = sum(p.numel() for p in model.parameters())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    comm = summary["comm"]
    assert comm["grad_bytes"] == 4 * params  # every gradient, float32, once per step
    # per BatchNorm layer: (sums, count) and the centred squares forward, their gradients backward
    assert comm["bn_bytes"] == sum(4 * 2 * (2 * bn.num_features + 1) for bn in bns)
    assert comm["collectives"] == comm["buckets"] + 4 * len(bns) and comm["buckets"] >= 1
    assert 0 < comm["comm_share"] < 1 and comm["comm_ms"] <= comm["step_ms"]
    assert comm["isolated_grad_allreduce_ms"] > 0 and comm["tiny_allreduce_ms"] > 0

    rows = {row["nodes"]: row for row in summary["projection"]}
    assert list(rows) == [1, 2, 4, 8]
    assert rows[1]["step_ms"] == pytest.approx(summary["compute_ms"]) and rows[1]["efficiency"] == 1
    for n, row in rows.items():  # ring all-reduce: 2(N-1)/N x volume / bandwidth + latency per transfer
        transfer = 2 * (n - 1) / n * comm["volume_bytes"] * 8 / 10e9 * 1e3
        latency = comm["collectives"] * 2 * (n - 1) * 30 / 1e3
        assert row["comm_ms"] == pytest.approx(transfer + latency)
        assert row["samples_per_s"] == pytest.approx(n * 2 / row["step_ms"] * 1e3)
    assert rows[1]["samples_per_s"] < rows[2]["samples_per_s"] < rows[4]["samples_per_s"] < rows[8]["samples_per_s"]
    assert "projection (ring all-reduce" in proc.stdout


@pytest.mark.slow
def test_quality_bench_scores_every_method_on_one_test_split_and_reads_a_real_folder(tmp_path: Path) -> None:
    """bench/quality.py: methods x fractions x seeds on one frozen test split (every cell the same
    test records), paired against CE-SSL; and the same harness on a mounted WFDB folder (the
    real Challenge 2021 records of the fixtures)."""
    quick = ["--steps", "2", "--seeds", "0", "1", "--methods", "head-only"]
    synthetic = run_bench("quality.py", [*quick, "--records", "60", "--ratios", "0.2"], tmp_path / "synth.json")
    rows = synthetic["rows"]
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in ("cessl", "head-only") for s in (0, 1)}
    assert len({tuple(r["test_ids"]) for r in rows}) == 1 and len(rows[0]["test_ids"]) == 18
    for r in rows:
        assert 0.0 <= r["macro_f_beta"] <= 1.0 and r["trainable"] < r["total"]
        assert (r["steps"] == 0) == (r["method"] == "head-only")
    assert len(synthetic["summary"]["head-only@0.2"]["diff_f_beta_vs_cessl"]) == 2
    source = str(ROOT / "tests" / "fixtures" / "ecg" / "cinc2021")
    real = run_bench(
        "quality.py",
        [*quick[:2], "--seeds", "0", "--methods", "cessl", "--source", source, "--min-positives", "3"],
        tmp_path / "real.json",
    )
    assert real["rows"][0]["n_test"] + real["rows"][0]["n_labelled"] > 0 and real["args"]["source"] == source
    missing = tmp_path / "no-such-folder"
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--source", str(missing), "--json", str(tmp_path / "x")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"bench/quality.py: {missing}: folder of WFDB records not found"
    assert not (tmp_path / "x").exists()
