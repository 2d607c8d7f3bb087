"""The pipeline steps as plain functions (no KFP): inputs -> outputs on a small hospital."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_support import make_backbone, make_hospital

from components.allocate_ranks import allocate_ranks_step
from components.backbone import resolve_backbone_step
from components.common import StepError, sha256_dir
from components.evaluate import evaluate_step
from components.finetune import CURVES_FILE, checkpoint_key, finetune_step
from components.ingest import ingest_step
from components.preprocess import preprocess_step
from components.register import collect_registration
from components.split import SplitConfig, split_step
from ml.data.splits import Splits
from ml.data.store import ECGStore
from ml.eval.challenge import challenge_score, scored_codes
from ml.eval.intervals import interval_text, metric_supports
from ml.eval.metrics import binarize
from ml.eval.predictor import load_predictor
from ml.model.lora import LoRAConfig
from ml.model.rank_allocation import RankAllocationConfig
from ml.train.callbacks import CurveRecorder, read_curves
from ml.train.config import TrainConfig

LORA = LoRAConfig(r=8)
FINETUNE = TrainConfig(method="cessl", max_steps=4, batch_size=8, val_every=2, seed=0, progress=False, log_every=1)
FINGERPRINT_FILE = "store_fingerprint.txt"


def allocate(work: Path, out: Path, method: str = "cessl", batch_size: int = 8, seed: int = 0):
    return allocate_ranks_step(
        work / "store",
        work / "splits.json",
        work / "backbone",
        out,
        method=method,
        lora=LORA,
        allocation=RankAllocationConfig(compress=0.6),
        batch_size=batch_size,
        seed=seed,
    )


def finetune(work: Path, train: TrainConfig, adapter: Path, curves: Path, checkpoint_root: Path):
    return finetune_step(
        work / "store",
        work / "splits.json",
        work / "backbone",
        work / "rank_map.json",
        adapter,
        curves,
        lora=LORA,
        train=train,
        checkpoint_root=checkpoint_root,
        store_fingerprint=(work / FINGERPRINT_FILE).read_text(),
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One hospital taken through ingest -> preprocess -> split -> backbone -> ranks."""
    root = tmp_path_factory.mktemp("steps")
    make_hospital(root / "hospital", records=80, seed=5, faults=True)
    ingest_step(str(root / "hospital"), root / "manifest", root / "quarantine.md", state_dir=root / "state")
    store = preprocess_step(root / "manifest", root / "store", min_count=5, state_dir=root / "state")
    (root / FINGERPRINT_FILE).write_text(store.fingerprint)
    split_step(root / "store", root / "splits.json", SplitConfig(labelled_ratio=0.3, seed=0))
    resolve_backbone_step(str(make_backbone(root / "pretrained")), "tinylight", root / "backbone")
    allocate(root, root / "rank_map.json")
    return root


@pytest.fixture(scope="module")
def trained(work) -> Path:
    finetune(work, FINETUNE, work / "adapter", work / "curves", work / "ckpt")
    evaluate_step(
        work / "store",
        work / "splits.json",
        work / "backbone",
        work / "adapter",
        work / "evaluation",
        work / "report.html",
    )
    return work


def test_ingest_quarantines_and_is_incremental(work, tmp_path):
    text = (work / "quarantine.md").read_text()
    assert "quarantined" in text.lower()
    again = ingest_step(str(work / "hospital"), tmp_path / "m2", tmp_path / "q2.md", state_dir=work / "state")
    assert again.read == 0 and again.reused == again.n_records + again.n_quarantined
    first = json.loads((work / "manifest" / "ingest_report.json").read_text())
    assert again.n_quarantined == first["quarantined"] > 0

    hospital = tmp_path / "hospital"
    shutil.copytree(work / "hospital", hospital)
    for path in hospital.glob("S00000.*"):
        path.unlink()  # a record that disappeared from the source
    fewer = ingest_step(str(hospital), tmp_path / "m3", tmp_path / "q3.md", state_dir=tmp_path / "state")
    assert fewer.n_records == again.n_records - 1
    assert fewer.fingerprint != again.fingerprint


def test_ingest_of_an_empty_folder_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepError, match="empty"):
        ingest_step(str(tmp_path / "empty"), tmp_path / "m", tmp_path / "q.md")


def test_split_is_deterministic_and_auditable(work, tmp_path, capsys):
    first = Splits.load(work / "splits.json")
    result = split_step(work / "store", tmp_path / "again.json", SplitConfig(labelled_ratio=0.3, seed=0))
    assert result.test_split_hash == first.test_split_hash
    # before any training: a test part this small cannot decide the gate, said on cessl run's terminal
    power = result.gate_power
    assert power["n_records"] == len(first.test) < power["required"] and not power["sufficient"]
    out = capsys.readouterr().out
    assert f"cessl-progress split: WARNING the champion gate cannot decide on this test set: {len(first.test)} " in out
    assert f"the gate needs >= {power['required']} (power 0.8" in out and "assumed from the test labels" in out
    assert json.loads((tmp_path / "again.json").read_text())["test"] == first.test
    parts = [set(getattr(first, p)) for p in ("test", "train", "valid", "unlabelled")]
    assert sum(map(len, parts)) == len(set().union(*parts)), "parts overlap"
    other = split_step(work / "store", tmp_path / "other.json", SplitConfig(labelled_ratio=0.3, seed=1))
    assert other.test_split_hash != first.test_split_hash


def test_rank_map_uses_r_and_r_low(work, tmp_path):
    rank_map = json.loads((work / "rank_map.json").read_text())
    assert set(rank_map.values()) == {8, 4}  # r = 8, r_low = (8 // 4) * 2
    assert len(rank_map) == 13  # tinylight: 14 layers, classifier.1 not adapted
    for method in ("lora", "full", "fixmatch"):  # uniform rank r or no adapters: nothing to allocate
        result = allocate(work, tmp_path / f"{method}.json", method=method)
        assert result.rank_map == {} and json.loads((tmp_path / f"{method}.json").read_text()) == {}


def test_rank_allocation_pass_uses_the_training_batch_and_a_seeded_shuffle(work, tmp_path, monkeypatch):
    """METHOD.md part 2: one pass with the training loader's batch size, shuffled by the run's seed."""
    import ml.train.recipe as recipe

    seen: list[list[torch.Tensor]] = []

    def spy(model, loader, variant="taylor", **kwargs):
        batches = list(loader)
        seen.append([x for x, _ in batches])
        return {name: float(i) for i, name in enumerate(model.adapted_layer_names()) if name != "classifier.1"}

    monkeypatch.setattr(recipe, "parameter_importance", spy)
    n_train = len(Splits.load(work / "splits.json").train)
    allocate(work, tmp_path / "a.json", batch_size=5, seed=0)
    allocate(work, tmp_path / "b.json", batch_size=5, seed=0)
    allocate(work, tmp_path / "c.json", batch_size=5, seed=1)
    allocate(work, tmp_path / "d.json", batch_size=10 * n_train, seed=0)  # clamped to the split
    first, again, other, whole = seen
    assert [len(x) for x in first] == [5] * (n_train // 5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.cat(first), torch.cat(other))
    assert [len(x) for x in whole] == [n_train]


def test_checkpoint_key_follows_the_schedule_not_progress_or_device(work):
    splits = Splits.load(work / "splits.json")
    key = functools.partial(checkpoint_key, "backbone", splits, "store", {"a": 8}, LORA)
    assert key(FINETUNE) == key(dataclasses.replace(FINETUNE, progress=True, device="cpu", checkpoint_dir="x"))
    assert key(FINETUNE) != key(dataclasses.replace(FINETUNE, lr=2e-3))
    assert key(FINETUNE) != checkpoint_key("backbone", splits, "store", {"a": 8}, LoRAConfig(r=4), FINETUNE)


def test_finetune_needs_the_store_fingerprint(work, tmp_path):
    with pytest.raises(StepError, match="fingerprint"):
        finetune_step(
            work / "store",
            work / "splits.json",
            work / "backbone",
            work / "rank_map.json",
            tmp_path / "adapter",
            tmp_path / "curves",
            lora=LORA,
            train=FINETUNE,
            checkpoint_root=tmp_path,
            store_fingerprint="",
        )


def test_finetune_outputs_adapter_and_curves(trained):
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    splits = Splits.load(trained / "splits.json")
    assert config["classes"] == splits.classes
    assert len(config["thresholds"]) == len(splits.classes)
    assert config["rank_map"] == json.loads((trained / "rank_map.json").read_text())
    # the resolved precision, in the adapter's JSON and in the train config MLflow logs (train.precision)
    assert config["precision"] == config["extra"]["train_config"]["precision"] == "fp32"
    curves = read_curves(trained / "curves")
    assert [r["step"] for r in curves if "train_loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in curves if "valid_macro_map" in r] == [0, 2, 4]  # validated at step 0 too


def test_evaluate_writes_metrics_tables_plots_and_report(trained):
    metrics = json.loads((trained / "evaluation" / "metrics.json").read_text())
    assert {"macro_f_beta", "macro_map", "ranking_loss", "coverage"} <= set(metrics["metrics"])
    values = metrics["metrics"]
    for metric in metric_supports(len(metrics["classes"])):  # each with its 95% interval over the test records
        if metric in values:  # (a metric undefined on this split is not reported)
            assert values[f"{metric}_low"] <= values[metric] <= values[f"{metric}_high"], metric
    assert {"challenge_score_low", "macro_auroc_low", "macro_map_low", "macro_g_beta_high"} <= set(values)
    for name in ("per_class.csv", "predictions.npz", "roc.png", "pr.png"):
        assert (trained / "evaluation" / name).stat().st_size > 0, name
    html = (trained / "report.html").read_text()
    assert "Per class" in html and "data:image/png;base64," in html
    assert "what it is" in html and "no_test_positive" in html
    assert f"<td>macro_map</td><td>{interval_text(values, 'macro_map')}</td>" in html and "macro_map_low" not in html


def test_evaluate_reports_the_official_challenge_score_over_every_scored_class(trained):
    """The official score is computed on the test records' labels of all 26 scored classes
    (the store's, not only the model's classes); the restricted one beside it."""
    metrics = json.loads((trained / "evaluation" / "metrics.json").read_text())
    splits = Splits.load(trained / "splits.json")
    with np.load(trained / "evaluation" / "predictions.npz") as saved:
        predicted = binarize(saved["probs"], saved["thresholds"])
        support = saved["labels"].sum(axis=0)
    scored = ECGStore.open(trained / "store").label_matrix(scored_codes(), splits.test)
    expected = challenge_score(scored, scored_codes(), predicted, splits.classes)
    assert metrics["metrics"]["challenge_score"] == pytest.approx(expected)
    assert "challenge_score_restricted" in metrics["metrics"]
    missing = [c for c, n in zip(splits.classes, support, strict=True) if n == 0]
    assert metrics["classes_without_positives"] == missing


def test_champion_is_scored_like_evaluate_and_carried_by_the_registration(trained, tmp_path):
    from components.evaluate import Champion, ChampionEvaluation, score_champion_step

    splits = Splits.load(trained / "splits.json")
    none = score_champion_step(trained / "store", trained / "splits.json", None, tmp_path / "none.json")
    assert (none.version, none.metrics, none.note) == (None, {}, "no champion")
    assert ChampionEvaluation.read(tmp_path / "none.json") == none
    broken = score_champion_step(
        trained / "store", trained / "splits.json", Champion("3", problem="gone"), tmp_path / "broken.json"
    )
    assert broken.version == "3" and not broken.scored and "gone" in broken.note
    # The same model scored as a champion on the same split gives evaluate's test metrics.
    champion = Champion("1", load_predictor(trained / "backbone", trained / "adapter"))
    scored = score_champion_step(
        trained / "store", trained / "splits.json", champion, tmp_path / "champion.json", trained / "evaluation"
    )
    assert scored.scored and scored.test_split_hash == splits.test_split_hash
    # Its per-record predictions on the same records, and the paired interval (the gate's
    # jackknife-t: no resamples) against the challenger (here the same model: a difference of
    # exactly 0, no class drop).
    kept = np.load(tmp_path / "champion.json" / "predictions.npz")
    assert list(kept["ids"]) == list(splits.test)
    gate = scored.gate
    assert gate["n_records"] == len(splits.test) and gate["n_resamples"] == 0
    interval = gate["intervals"]["macro_f_beta"]
    assert interval["method"] == "jackknife-t"
    assert interval["estimate"] == interval["ci_low"] == interval["ci_high"] == 0.0
    assert all(c["drop"] == 0.0 for c in gate["per_class"])
    assert (
        "no challenger predictions"
        in score_champion_step(trained / "store", trained / "splits.json", champion, tmp_path / "alone").gate_note
    )

    kwargs = dict(
        splits_path=trained / "splits.json",
        backbone_dir=trained / "backbone",
        rank_map_path=trained / "rank_map.json",
        adapter_dir=trained / "adapter",
        curves_path=trained / "curves",
        evaluation_dir=trained / "evaluation",
        champion_path=tmp_path / "champion.json",
        params={"method": "cessl", "r": 8},
        data_version="md5-x",
        git_commit="abc",
    )
    bundle = collect_registration(**kwargs)
    assert bundle.tags["data_version"] == "md5-x"
    assert bundle.tags["test_split_hash"] == splits.test_split_hash
    assert "evaluation/per_class.csv" in bundle.artifacts and "training/curves.jsonl" in bundle.artifacts
    assert collect_registration(**kwargs).fingerprint == bundle.fingerprint
    assert bundle.champion == scored
    assert {"champion/predictions.npz", "champion/paired_bootstrap.json"} <= set(bundle.artifacts)
    for key, value in bundle.test_metrics.items():
        assert scored.metrics[key] == pytest.approx(value, abs=1e-6), key


def test_finetune_resumes_after_an_interruption(trained, tmp_path, monkeypatch):
    """Killed at its last validation (step 4), after its step-2 checkpoint: the next call
    continues at step 2 and ends identical to the uninterrupted run (``trained``'s own)."""
    # the uninterrupted run's result, read back from its checkpoint folder
    reference = finetune(trained, FINETUNE, tmp_path / "ref", tmp_path / "ref_curves", trained / "ckpt")
    original = CurveRecorder.on_validation

    def crash_at_the_last_validation(self, step, metrics):
        original(self, step, metrics)
        if step == FINETUNE.max_steps:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(CurveRecorder, "on_validation", crash_at_the_last_validation)
    with pytest.raises(KeyboardInterrupt):
        finetune(trained, FINETUNE, tmp_path / "out", tmp_path / "curves", tmp_path / "b")
    monkeypatch.setattr(CurveRecorder, "on_validation", original)
    resumed = finetune(trained, FINETUNE, tmp_path / "out", tmp_path / "curves", tmp_path / "b")

    assert resumed.resumed_from == 2 and resumed.steps == FINETUNE.max_steps == 4
    assert [r["step"] for r in read_curves(tmp_path / "curves") if "train_loss" in r] == [1, 2, 3, 4]
    assert sha256_dir(tmp_path / "out") == sha256_dir(trained / "adapter")
    assert reference.best_score == pytest.approx(resumed.best_score)
    assert Path(resumed.checkpoint_dir, CURVES_FILE).is_file()


def test_predictor_reads_wfdb_records(trained, ecg_records_dir):
    predictor = load_predictor(trained / "backbone", trained / "adapter")
    table = predictor.predict_records([ecg_records_dir / "E07500", trained / "hospital" / "S00001.hea"])
    assert list(table["record"]) == ["E07500", "S00001"]
    probs = table[[c for c in table.columns if c.startswith("p_")]].to_numpy()
    assert probs.shape == (2, len(predictor.classes)) and np.all((probs >= 0) & (probs <= 1))
    raw = np.random.default_rng(0).normal(size=(2, 12, 5000)).astype(np.float32)
    assert predictor.predict_raw(raw).shape == (2, len(predictor.classes))
    with pytest.raises(FileNotFoundError, match="nope"):
        predictor.predict_records([trained / "nope"])


def test_finetune_in_epochs_mode_logs_and_keys_the_real_step_count(work, tmp_path):
    """epochs mode: steps = complete labelled batches x epochs, resolved before the checkpoint
    key and the adapter's logged config; the step's cost figures are measured."""
    from ml.model.pretrained import read_backbone
    from ml.train.config import steps_for_epochs

    n_train = len(Splits.load(work / "splits.json").train)
    train = dataclasses.replace(FINETUNE, epochs=2, max_steps=1000)
    result = finetune(work, train, tmp_path / "adapter", tmp_path / "curves", tmp_path / "ckpt")
    steps = steps_for_epochs(n_train, min(FINETUNE.batch_size, n_train), 2)
    assert result.steps == steps and result.extra["schedule"] == f"2 epochs = {steps} steps"
    logged = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["extra"]["train_config"]
    assert (logged["epochs"], logged["max_steps"]) == (2, steps)
    resolved = dataclasses.replace(train, max_steps=steps)
    splits = Splits.load(work / "splits.json")
    rank_map = json.loads((work / "rank_map.json").read_text())
    identity = read_backbone(work / "backbone").identity
    key = checkpoint_key(identity, splits, (work / FINGERPRINT_FILE).read_text(), rank_map, LORA, resolved)
    assert Path(result.checkpoint_dir).name == key
    assert result.ms_per_step > 0 and result.peak_memory_mb >= 0 and result.memory_measure
    assert {"ms_per_step", "peak_memory_mb", "trainable_params"} <= set(result.summary_metrics())
