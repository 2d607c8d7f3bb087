"""KFP wrappers of the pipeline steps: the decorator and the image are the only KFP parts.

Every step is a plain, typed Python function in ``components/`` (no kfp there). Here each
one gets a thin lightweight-component body that imports that function inside the
container, maps KFP artifacts (``Dataset``, ``Model``, ``Metrics``,
``ClassificationMetrics``, ``HTML``, ``Markdown``) to paths and records a little
metadata on them. :func:`build_components` applies ``dsl.component`` with the project
image chosen at compile time (``install_kfp_package=False``: the image already has kfp);
:func:`build_compare_components` does the same for the comparison's own steps
(``start_comparison``, ``log_cell``, ``summarize_comparison``; ``pipeline.dags.compare``).

No ``from __future__ import annotations`` here: KFP reads the real annotation objects.
The bodies must be self-contained (KFP ships their source into the container), so every
import lives inside the function.
"""

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional  # noqa: UP035 (KFP reads typing's List and Optional)

from kfp import dsl
from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)

from pipeline.dags import kfp_speedup

kfp_speedup.install()  # kfp's task setters without inspect.stack() (see the module)

DEFAULT_IMAGE = "localhost:5000/cessl:0.1.0"
IMAGE_ENV = "CESSL_IMAGE"


def default_image() -> str:
    """The project image: ``$CESSL_IMAGE`` or :data:`DEFAULT_IMAGE`."""
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


# --------------------------------------------------------------------------- bodies


def validate(params: dict) -> str:
    """The first step: every pipeline parameter against its constraints (the field metadata
    of :class:`pipeline.core.params.PipelineParams`), all problems in one message, before any
    work; a cluster run gets the answers ``cessl run`` gives. Returns the schedule in words."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    from pipeline.core.params import PipelineParams

    return PipelineParams.from_mapping(params).schedule()


def ingest(
    source: str,
    data_version: str,
    state_dir: str,
    manifest: Output[Dataset],
    quarantine_report: Output[Markdown],
    site: str = "",
) -> NamedTuple("IngestOutputs", [("n_records", int), ("n_quarantined", int), ("data_version", str)]):
    """Read and validate WFDB records from a folder or s3:// prefix; quarantine the bad ones.

    ``data_version`` (part of the task's cache key, so new data means a new ingest): the
    caller's; an ``s3://`` source's is recomputed from the listing ingested (the objects'
    own version); empty for a folder (e.g. a scheduled run): the manifest's content hash.
    ``site``: the network site the records belong to (their identity is (site, path)).
    """
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    from pathlib import Path

    from components.ingest import ingest_step
    from pipeline.core.logsafe import name_task_logs

    name_task_logs(f"site {site}" if site else "")

    result = ingest_step(
        source, Path(manifest.path), Path(quarantine_report.path), state_dir=state_dir or None, site=site
    )
    if result.source_version and data_version and result.source_version != data_version:
        import logging

        logging.getLogger("cessl.ingest").warning(
            "%s changed since the run was submitted (data version %s then, %s now): recording what was ingested",
            source,
            data_version,
            result.source_version,
        )
    version = result.source_version or data_version or f"manifest:{result.fingerprint[:32]}"
    manifest.metadata.update(
        {
            "source": source,
            "data_version": version,
            "n_records": result.n_records,
            "n_quarantined": result.n_quarantined,
            "fingerprint": result.fingerprint,
        }
    )
    quarantine_report.metadata["n_quarantined"] = result.n_quarantined
    outputs = NamedTuple("IngestOutputs", [("n_records", int), ("n_quarantined", int), ("data_version", str)])
    return outputs(result.n_records, result.n_quarantined, version)


def preprocess(manifest: Input[Dataset], min_class_count: int, state_dir: str, store: Output[Dataset]) -> int:
    """Resample, band-pass, standardise and fix the length; write one dataset store."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    from pathlib import Path

    from components.preprocess import preprocess_step

    result = preprocess_step(
        Path(manifest.path), Path(store.path), min_count=min_class_count, state_dir=state_dir or None
    )
    store.metadata.update(
        {
            "n_records": result.n_records,
            "classes": list(result.classes),
            "fingerprint": result.fingerprint,
            "data_version": manifest.metadata.get("data_version", ""),
        }
    )
    return result.n_records


def resolve_testset(model_name: str, method: str, tracking_uri: str, frozen_testset: str) -> str:
    """Which frozen test set the split uses: the registered model's current version (a
    reference the split fetches), or "" when it has none yet or ``frozen_testset`` is "none".
    Not cached: a ``cessl testset refresh`` changes it, and so re-runs the split."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    from pipeline.registry.policy import registration_model_name
    from pipeline.registry.store import TrackingConfig
    from pipeline.registry.testsets import resolve_reference

    name = registration_model_name(model_name, method)  # the candidates model holds the frozen test set
    return resolve_reference(TrackingConfig.resolve(tracking_uri, model_name=name), frozen_testset)


def split(
    store: Input[Dataset],
    labelled_ratio: float,
    test_ratio: float,
    seed: int,
    test_seed: int,
    frozen_testset: str,
    tracking_uri: str,
    splits: Output[Dataset],
) -> NamedTuple("SplitOutputs", [("test_split_hash", str), ("sizes", str)]):
    """Iterative stratified test / labelled train / labelled valid / unlabelled split (ids);
    the test cut drawn with ``test_seed`` (a run's own seed; one seed for every cell of a
    comparison). With a frozen test set (``frozen_testset``: resolve_testset's reference) its
    records are the test part and new records only go to train / valid / unlabelled."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    import json
    import tempfile
    from pathlib import Path

    from components.split import SplitConfig, split_step

    config = SplitConfig(labelled_ratio=labelled_ratio, test_ratio=test_ratio, seed=seed, test_seed=test_seed)
    with tempfile.TemporaryDirectory(prefix="cessl-testset-") as tmp:
        frozen_path = None
        if frozen_testset:  # fetched from MLflow here: components/split.py reads a plain file
            from pipeline.registry.testsets import materialize

            frozen_path = materialize(frozen_testset, tracking_uri, Path(tmp) / "testset.json")
        result = split_step(Path(store.path), Path(splits.path), config, frozen_path)
    splits.metadata.update(
        {"sizes": result.sizes, "test_split_hash": result.test_split_hash, "fingerprint": result.fingerprint}
    )
    splits.metadata["gate_power"] = result.gate_power  # can the champion gate decide on this test part?
    if result.testset:
        report = result.testset
        splits.metadata["testset"] = {
            "version": report["version"],
            "status": report["status"],
            "n_changed": len(report.get("changed", [])),
            "n_missing": len(report.get("missing", [])),
        }
    outputs = NamedTuple("SplitOutputs", [("test_split_hash", str), ("sizes", str)])
    return outputs(result.test_split_hash, json.dumps(result.sizes, sort_keys=True))


def resolve_backbone(
    backbone: str, backbone_config: str, cache_dir: str, tracking_uri: str, backbone_model: Output[Model]
) -> str:
    """Fetch the pre-trained backbone: "default", a backbone folder, a checkpoint file, s3://...,
    or a backbone registered in MLflow (``models:/cessl-backbone-<config>/<version>`` or ``@alias``)."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    import tempfile
    from pathlib import Path

    from components.backbone import resolve_backbone_step

    spec = backbone
    if backbone.startswith("models:/"):
        from pipeline.registry.backbones import fetch_backbone

        spec = str(fetch_backbone(backbone, tempfile.mkdtemp(prefix="cessl-backbone-"), tracking_uri=tracking_uri))
    info = resolve_backbone_step(spec, backbone_config, Path(backbone_model.path), cache_dir=cache_dir or None)
    backbone_model.metadata.update(info.metadata() | {"origin": backbone})
    return info.identity


def allocate_ranks(
    store: Input[Dataset],
    splits: Input[Dataset],
    backbone_model: Input[Model],
    method: str,
    r: int,
    p: float,
    compress: float,
    labelled_ratio: float,
    batch_size: int,
    seed: int,
    rank_map: Output[Artifact],
    rank_metrics: Output[Metrics],
) -> str:
    """One-shot Taylor importance on the labelled train split -> per-layer rank map (JSON)."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    from pathlib import Path

    from components.allocate_ranks import allocate_ranks_step
    from components.common import write_metadata_file
    from pipeline.core.params import PipelineParams

    run = PipelineParams(
        method=method, r=r, p=p, compress=compress, labelled_ratio=labelled_ratio, batch_size=batch_size, seed=seed
    )
    result = allocate_ranks_step(
        Path(store.path),
        Path(splits.path),
        Path(backbone_model.path),
        Path(rank_map.path),
        method=method,
        lora=run.lora_config(),
        allocation=run.allocation_config(),
        batch_size=run.resolved_batch_size,
        seed=seed,
    )
    rank_map.metadata.update({"r": r, "compress": compress, "method": method, "fingerprint": result.fingerprint})
    for name, rank in sorted(result.rank_map.items()):
        rank_metrics.log_metric(f"rank.{name}", rank)
    write_metadata_file(rank_metrics)
    return result.summary


def finetune(
    store: Input[Dataset],
    splits: Input[Dataset],
    backbone_model: Input[Model],
    rank_map: Input[Artifact],
    method: str,
    r: int,
    p: float,
    labelled_ratio: float,
    epochs: int,
    max_steps: int,
    batch_size: int,
    lr: float,
    val_every: int,
    seed: int,
    checkpoint_root: str,
    adapter: Output[Model],
    curves: Output[Artifact],
    train_metrics: Output[Metrics],
    precision: str = "fp32",
    head_init: str = "linear-probe",
    site: str = "",
) -> str:
    """CE-SSL fine-tuning (GPU when there is one), resumable from its last checkpoint.

    ``epochs`` > 0: that many epochs of complete labelled batches; 0: ``max_steps`` steps.
    ``precision``: fp32, bf16 or auto (bf16 on a GPU that supports it), resolved in the step.
    ``head_init``: random, or linear-probe (the classifier starts from the head-only probe).
    ``site``: a network site's name: its log lines and progress lines name it.
    """
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    from pathlib import Path

    from components.common import write_metadata_file
    from components.finetune import finetune_step
    from pipeline.core.logsafe import name_task_logs
    from pipeline.core.params import PipelineParams

    name_task_logs(f"site {site}" if site else "")

    run = PipelineParams(
        method=method,
        r=r,
        p=p,
        labelled_ratio=labelled_ratio,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        val_every=val_every,
        seed=seed,
        precision=precision,
        head_init=head_init,
    )
    result = finetune_step(
        Path(store.path),
        Path(splits.path),
        Path(backbone_model.path),
        Path(rank_map.path),
        Path(adapter.path),
        Path(curves.path),
        lora=run.lora_config(),
        train=run.train_config(progress=False),
        checkpoint_root=checkpoint_root or None,
        store_fingerprint=str(store.metadata.get("fingerprint", "")),
        progress_label=f"fine-tune site {site} ({method})" if site else "",
    )
    adapter.metadata.update(result.metadata())
    for key, value in result.summary_metrics().items():
        train_metrics.log_metric(key, value)
    write_metadata_file(train_metrics)
    return result.checkpoint_dir


def evaluate(
    store: Input[Dataset],
    splits: Input[Dataset],
    backbone_model: Input[Model],
    adapter: Input[Model],
    test_metrics: Output[Metrics],
    roc: Output[ClassificationMetrics],
    report: Output[HTML],
    evaluation: Output[Artifact],
    confusion: Output[Markdown],
) -> str:
    """Challenge metrics on the test split, per-class table, ROC/PR plots and an HTML report;
    ``confusion``: per class TP/FP/FN/TN and F-beta2 with its name (a Markdown table in the KFP UI)."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    import json
    from pathlib import Path

    from components.common import write_metadata_file
    from components.evaluate import CONFUSION_FILE, evaluate_step

    result = evaluate_step(
        Path(store.path),
        Path(splits.path),
        Path(backbone_model.path),
        Path(adapter.path),
        Path(evaluation.path),
        Path(report.path),
    )
    for key, value in result.metrics.items():
        test_metrics.log_metric(key, value)
    fpr, tpr, thresholds = result.micro_roc()
    roc.log_roc_curve(fpr, tpr, thresholds)
    write_metadata_file(test_metrics)
    write_metadata_file(roc)
    evaluation.metadata.update({"test_split_hash": result.test_split_hash, "n_test": result.n_test})
    Path(confusion.path).parent.mkdir(parents=True, exist_ok=True)
    Path(confusion.path).write_text(
        (Path(evaluation.path) / CONFUSION_FILE).read_text(encoding="utf-8"), encoding="utf-8"
    )
    return json.dumps(result.metrics, sort_keys=True)


def score_champion(
    store: Input[Dataset],
    splits: Input[Dataset],
    evaluation: Input[Artifact],
    model_name: str,
    method: str,
    tracking_uri: str,
    champion_evaluation: Output[Artifact],
) -> str:
    """The production model's current champion scored on this run's test split (as evaluate
    scores the new model), its per-record predictions and the paired bootstrap of the new model
    against it on the same records (for the run's report: ``cessl promote`` recomputes its own
    evidence), or an explicit "no champion"; returns the champion's version ("" for none)."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    from pathlib import Path

    from components.evaluate import score_champion_step
    from pipeline.registry.policy import load_champion, registered_model_name
    from pipeline.registry.store import TrackingConfig

    name = registered_model_name(model_name, method)
    champion = load_champion(TrackingConfig.resolve(tracking_uri, model_name=name))
    result = score_champion_step(
        Path(store.path), Path(splits.path), champion, Path(champion_evaluation.path), Path(evaluation.path)
    )
    champion_evaluation.metadata.update(result.metadata())
    return result.version or ""


def register(
    splits: Input[Dataset],
    backbone_model: Input[Model],
    rank_map: Input[Artifact],
    adapter: Input[Model],
    curves: Input[Artifact],
    evaluation: Input[Artifact],
    champion_evaluation: Input[Artifact],
    report: Input[HTML],
    quarantine_report: Input[Markdown],
    params: dict,
    registration: Output[Markdown],
    kfp_run_id: str = "",
    kfp_run_name: str = "",
    kfp_pipeline_name: str = "",
    site: Optional[dict] = None,  # noqa: UP045 (KFP: Optional, not X | None)
    network_id: str = "",
) -> NamedTuple("RegisterOutputs", [("run_id", str), ("model_version", str)]):
    """Log the run to MLflow and register the adapter as a version of the candidates model
    (``<model>-candidates``: the pipeline never writes a production model), with the digests of
    its artifacts; alias ``challenger`` for a production method only.

    ``site`` / ``network_id``: a hospital network's run (``pipeline.dags.network``): ``site`` is
    the site's loop item (its name, its registered model ``<model>-<site>``, source and
    overrides, which replace those of ``params``); the site and the network run are tagged
    on the run and the model version (``site``, ``cessl.network_id``).

    ``params``: the run's :class:`pipeline.core.params.PipelineParams` as one mapping (its
    ``data_version`` the one ingest settled on). ``kfp_run_id`` / ``kfp_run_name``: the KFP
    run's (``dsl.PIPELINE_JOB_ID_PLACEHOLDER`` / ``PIPELINE_JOB_NAME_PLACEHOLDER``, filled in
    by the backend or kfp.local), tagged on the MLflow run with the pipeline's name.
    """
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    import json
    from pathlib import Path

    from components.register import collect_registration
    from ml.data.splits import Splits
    from pipeline.core.logsafe import name_task_logs
    from pipeline.core.params import PipelineParams, field_types
    from pipeline.registry.lineage import lineage_tags, params_as_run, step_records
    from pipeline.registry.policy import TAG_GATE_POWER, registration_model_name
    from pipeline.registry.store import TrackingConfig
    from pipeline.registry.testsets import after_registration
    from pipeline.registry.tracking import log_and_register

    site = dict(site or {})
    name_task_logs(f"site {site['name']}" if site else "")
    # the site's own values (source, overrides, model); the data version is the one ingest settled on
    own = {k: v for k, v in site.items() if k in field_types() and k != "data_version"}
    run = PipelineParams.from_mapping({**params, **own})
    # logged: what the steps recorded they used (splits.json, the rank map, adapter_config.json)
    run = params_as_run(run, step_records(Path(splits.path), Path(adapter.path), dict(rank_map.metadata)))
    bundle = collect_registration(
        splits_path=Path(splits.path),
        backbone_dir=Path(backbone_model.path),
        rank_map_path=Path(rank_map.path),
        adapter_dir=Path(adapter.path),
        curves_path=Path(curves.path),
        evaluation_dir=Path(evaluation.path),
        champion_path=Path(champion_evaluation.path),
        report_path=Path(report.path),
        quarantine_path=Path(quarantine_report.path),
        params=run.logged(),
        data_version=run.data_version,
        git_commit=run.git_commit,
    )
    if "n_quarantined" in quarantine_report.metadata:  # ingest's count, for `cessl run`'s summary
        bundle.tags["n_quarantined"] = str(int(quarantine_report.metadata["n_quarantined"]))
    if splits.metadata.get("gate_power"):  # the split's power check of the test part, for the summary
        bundle.tags[TAG_GATE_POWER] = json.dumps(dict(splits.metadata["gate_power"]), sort_keys=True)
    if site:
        from pipeline.registry.network_tracking import TAG_NETWORK, TAG_SITE, site_run_name

        bundle.tags[TAG_SITE] = str(site["name"])
        bundle.run_name = site_run_name(str(site["name"]), bundle.run_name)
        if network_id:
            bundle.tags[TAG_NETWORK] = network_id
    name = registration_model_name(run.model_name, run.method)  # <model>-candidates: never a production model
    tracking = TrackingConfig.resolve(run.tracking_uri, run.experiment_name, name)
    lineage = lineage_tags(run.git_commit, kfp_run_id, kfp_run_name, kfp_pipeline_name)
    result = log_and_register(bundle, tracking, lineage)
    # The first registration of a model freezes its test set (or a pending refresh's redraw).
    after_registration(tracking.client(), name, result.version, result.run_id, Splits.load(splits.path))
    Path(registration.path).write_text(result.markdown(), encoding="utf-8")
    registration.metadata.update(
        {
            "run_id": result.run_id,
            "model_version": result.version,
            "model_name": result.model_name,
            "reused": result.reused,
            "site": str(site.get("name", "")),
            "data_version": run.data_version,
            "n_quarantined": int(quarantine_report.metadata.get("n_quarantined", -1)),
        }
    )
    outputs = NamedTuple("RegisterOutputs", [("run_id", str), ("model_version", str)])
    return outputs(result.run_id, result.version)


# --------------------------------------------------------------------------- comparison bodies


def start_comparison(grid: list, params: dict, comparison_id: str, comparison: Output[Artifact]) -> str:
    """Open the comparison's MLflow parent run; ``comparison`` says where it is (the cells log
    child runs under it). ``params``: the choices every cell shares (PipelineParams fields)."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    from pathlib import Path

    from components.compare import GRID_FIELDS, CompareGrid
    from pipeline.core.params import PipelineParams
    from pipeline.registry.compare_tracking import start_comparison as start
    from pipeline.registry.lineage import lineage_tags
    from pipeline.registry.store import TrackingConfig

    run = PipelineParams.from_mapping(params)
    shared = {k: v for k, v in run.logged().items() if k in params and k not in GRID_FIELDS}
    tracking = TrackingConfig.resolve(run.tracking_uri, run.experiment_name)
    tags = {"data_version": run.data_version, "git_commit": run.git_commit, **lineage_tags(run.git_commit)}
    parent = start(
        tracking, comparison_id, CompareGrid.from_items(grid), shared | {"data_version": run.data_version}, tags
    )
    parent.write(Path(comparison.path))
    comparison.metadata.update({"run_id": parent.run_id, "comparison_id": comparison_id})
    return parent.run_id


def log_cell(
    comparison: Input[Artifact],
    splits: Input[Dataset],
    adapter: Input[Model],
    curves: Input[Artifact],
    evaluation: Input[Artifact],
    method: str,
    labelled_ratio: float,
    seed: int,
    test_seed: int,
    tracking_uri: str,
    experiment_name: str,
) -> str:
    """Log one cell of the comparison as an MLflow child run (nothing is registered), with its
    predictions on the shared test split; returns the cell's result (JSON) for the summary."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    import json
    from pathlib import Path

    from components.compare import Cell, read_cell
    from components.evaluate import PREDICTIONS_FILE
    from ml.train.callbacks import read_curves
    from pipeline.registry.compare_tracking import ComparisonRun, log_cell_run
    from pipeline.registry.store import TrackingConfig

    parent = ComparisonRun.read(Path(comparison.path))
    result = read_cell(
        Cell(method, labelled_ratio, seed, test_seed),
        Path(evaluation.path),
        dict(adapter.metadata),
        dict(splits.metadata),
    )
    adapter_config = json.loads((Path(adapter.path) / "adapter_config.json").read_text(encoding="utf-8"))
    result.run_id = log_cell_run(
        TrackingConfig.resolve(tracking_uri, experiment_name),
        parent,
        result,
        train_config=adapter_config.get("extra", {}).get("train_config", {}),
        curves=read_curves(Path(curves.path)),
        predictions=Path(evaluation.path) / PREDICTIONS_FILE,
    )
    return result.to_json()


def summarize_comparison(
    comparison: Input[Artifact],
    cells: list,
    tracking_uri: str,
    experiment_name: str,
    table: Output[Markdown],
    files: Output[Artifact],
) -> str:
    """Mean +- std over seeds per (method, labelled ratio), and each method's paired difference
    against CE-SSL on the shared test records: CSV, Markdown and a plot, logged to the parent
    run (FINISHED then); returns the parent run's id."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    import shutil
    import tempfile
    from pathlib import Path

    from components.compare import CellResult, comparison_table, write_comparison
    from pipeline.registry.compare_tracking import ComparisonRun, cell_predictions, finish_comparison
    from pipeline.registry.store import TrackingConfig

    parent = ComparisonRun.read(Path(comparison.path))
    results = [CellResult.from_json(cell) for cell in cells]
    config = TrackingConfig.resolve(tracking_uri, experiment_name)
    with tempfile.TemporaryDirectory(prefix="cessl-cells-") as tmp:
        written = write_comparison(results, Path(files.path), cell_predictions(config, results, Path(tmp)))
    shutil.copyfile(written.markdown, table.path)
    finish_comparison(config, parent, written, comparison_table(results))
    files.metadata.update({"run_id": parent.run_id, "n_cells": len(results)})
    return parent.run_id


# --------------------------------------------------------------------------- network bodies


def start_network(sites: list, params: dict, network_id: str, kfp_run_id: str, network: Output[Artifact]) -> str:
    """Check every site's parameters (the shared ``params`` with the site's own values: all
    problems in one message, as validate does for one run), then open the network's MLflow
    parent run; ``network`` says where it is. Returns the parent run's id."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    from pathlib import Path

    from ml.errors import ParameterError
    from pipeline.core.params import PipelineParams
    from pipeline.registry.lineage import lineage_tags
    from pipeline.registry.network_tracking import start_network as start
    from pipeline.registry.store import TrackingConfig

    shared = PipelineParams.from_mapping(params)
    if not sites:
        raise ParameterError("sites: the network run has no site")
    problems, fields = [], set(shared.arguments())
    for item in sites:
        values = {k: v for k, v in dict(item).items() if k in fields}
        try:
            PipelineParams.from_mapping({**shared.arguments(), **values})
        except ParameterError as err:
            problems.append(f"site {item.get('name', '?')}: {err}")
    if problems:
        raise ParameterError("; ".join(problems))
    tracking = TrackingConfig.resolve(shared.tracking_uri, shared.experiment_name)
    tags = {"git_commit": shared.git_commit, **lineage_tags(shared.git_commit, kfp_run_id)}
    parent = start(tracking, network_id, list(sites), shared.logged(), tags)
    parent.write(Path(network.path))
    network.metadata.update({"run_id": parent.run_id, "network_id": parent.network_id})
    return parent.run_id


def cross_site(
    network: Input[Artifact],
    backbone_model: Input[Model],
    stores: Input[List[Dataset]],  # noqa: UP006 (KFP: typing.List)
    splits: Input[List[Dataset]],  # noqa: UP006 (KFP: typing.List)
    adapters: Input[List[Model]],  # noqa: UP006
    baselines: Input[List[Model]],  # noqa: UP006
    registrations: Input[List[Markdown]],  # noqa: UP006
    tracking_uri: str,
    experiment_name: str,
    matrix: Output[Markdown],
    files: Output[Artifact],
) -> str:
    """Every site's adapter and the backbone without adaptation scored on every site's test
    split, each site's plain-LoRA baseline (``baselines``) on its own (``components.cross_site``);
    the matrix (CSV, Markdown, heat map) logged to the network's parent run, the site runs nested
    under it. Returns the network's summary (JSON: parent run, per-site registration, the
    matrix's cells, each site's adapter against its baselines)."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    import json
    import shutil
    from pathlib import Path

    from components.common import StepError
    from components.cross_site import SiteArtifacts, cross_site_step
    from pipeline.registry.network_tracking import NetworkRun, finish_network
    from pipeline.registry.store import TrackingConfig

    parent = NetworkRun.read(Path(network.path))
    if not len(stores) == len(splits) == len(adapters) == len(baselines) == len(registrations):
        raise StepError(
            f"cross-site: {len(stores)} stores, {len(splits)} splits, {len(adapters)} adapters, "
            f"{len(baselines)} baseline adapters and {len(registrations)} registrations collected: "
            "one of each per site expected"
        )
    sites = [
        SiteArtifacts(
            str(reg.metadata.get("site", f"site-{i}")), Path(st.path), Path(sp.path), Path(ad.path), Path(bl.path)
        )
        for i, (st, sp, ad, bl, reg) in enumerate(zip(stores, splits, adapters, baselines, registrations, strict=True))
    ]
    result, written = cross_site_step(Path(backbone_model.path), sites, Path(files.path))
    shutil.copyfile(written.markdown, matrix.path)
    cells = result.to_records()
    registered = [
        {
            "site": str(reg.metadata.get("site", "")),
            "model_name": str(reg.metadata.get("model_name", "")),
            "model_version": str(reg.metadata.get("model_version", "")),
            "run_id": str(reg.metadata.get("run_id", "")),
            "reused": bool(reg.metadata.get("reused", False)),
            "data_version": str(reg.metadata.get("data_version", "")),
            "n_quarantined": int(reg.metadata.get("n_quarantined", -1)),
            "n_records": int(st.metadata.get("n_records", -1)),
        }
        for reg, st in zip(registrations, stores, strict=True)
    ]
    finish_network(
        TrackingConfig.resolve(tracking_uri, experiment_name),
        parent,
        written.artifacts(),
        cells,
        [str(r["run_id"]) for r in registered],
    )
    files.metadata.update({"run_id": parent.run_id, "n_sites": len(sites)})
    summary = {
        "parent_run_id": parent.run_id,
        "network_id": parent.network_id,
        "sites": registered,
        "cells": cells,
        "comparisons": result.comparison_records(),
    }
    return json.dumps(summary, sort_keys=True)


# --------------------------------------------------------------------------- pre-training bodies


def validate_pretrain(params: dict) -> str:
    """The pre-training pipeline's first step: every parameter against its constraints
    (:class:`pipeline.core.pretrain_params.PretrainParams`), all problems in one message, before
    any work. Returns the job in words."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    from pipeline.core.pretrain_params import PretrainParams

    return PretrainParams.from_mapping(params).describe()


def pretrain_backbone(
    store: Input[Dataset],
    backbone_config: str,
    epochs: int,
    max_steps: int,
    batch_size: int,
    base_lr: float,
    lr: float,
    weight_decay: float,
    cutmix_alpha: float,
    seed: int,
    checkpoint_every: int,
    device: str,
    nodes: int,
    nproc_per_node: int,
    gpus_per_node: int,
    cpu_per_node: str,
    memory_per_node: str,
    backend: str,
    trainer_image: str,
    runtime: str,
    trainjob_namespace: str,
    timeout_s: int,
    checkpoint_pvc: str,
    checkpoint_root: str,
    backbone: Output[Model],
) -> str:
    """Launch the pre-training job (a Kubeflow Trainer TrainJob on ``cluster`` / ``docker``,
    a child process for ``local``), wait for it (``timeout_s``, its logs streamed here) and
    output the backbone folder. On a cluster the store, the checkpoints and the job's backbone
    live on the shared volume ``checkpoint_pvc``, mounted at ``checkpoint_root``; a retried
    step resumes the job from its last checkpoint. Returns the job's name."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    import os
    from pathlib import Path

    from components.pretrain import JobFolders, launch_step
    from components.trainjob import DEFAULT_IMAGE, PretrainJob, node_resources
    from ml.train.pretrain_config import PretrainConfig, PretrainRun

    config = PretrainConfig(
        backbone=backbone_config,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        base_lr=base_lr,
        lr=lr,
        weight_decay=weight_decay,
        cutmix_alpha=cutmix_alpha,
        seed=seed,
        checkpoint_every=checkpoint_every,
        device=device,
    )
    run = PretrainRun(store.path, backbone.path, config, data_version=str(store.metadata.get("data_version", "")))
    job = PretrainJob(
        run,
        nodes=nodes,
        nproc_per_node=nproc_per_node,
        backend=backend,
        image=trainer_image or os.environ.get("CESSL_IMAGE") or DEFAULT_IMAGE,
        runtime=runtime,
        namespace=trainjob_namespace or None,
        timeout_s=timeout_s,
        resources_per_node=node_resources(gpus_per_node, cpu_per_node, memory_per_node),
        workspace_pvc=checkpoint_pvc or None,
    )
    folders = JobFolders(checkpoint_root, store_fingerprint=str(store.metadata.get("fingerprint", "")))
    result = launch_step(job, Path(backbone.path), folders)
    backbone.metadata.update(
        {
            "name": backbone_config,
            "job": result.job_name,
            "backend": result.backend,
            "world_size": nodes * nproc_per_node,
            "seconds": round(result.seconds, 1),
            "data_version": str(store.metadata.get("data_version", "")),
        }
    )
    return result.job_name


def register_backbone(
    backbone: Input[Model],
    tracking_uri: str,
    alias: str,
    git_commit: str,
    kfp_run_id: str,
    kfp_run_name: str,
    kfp_pipeline_name: str,
    registration: Output[Markdown],
) -> NamedTuple("BackboneRegistrationOutputs", [("model_name", str), ("model_version", str), ("run_id", str)]):
    """Log the backbone folder to MLflow and register it as a version of
    ``cessl-backbone-<config>`` (``pipeline.registry.backbones``: the same weights give back
    their existing version); ``alias`` ('' for none) points at it. The KFP run is tagged on
    the MLflow run (lineage)."""
    from pipeline.core.process import die_with_parent

    die_with_parent()  # a task dies with the process that started it (kill -9 of cessl run)
    from pathlib import Path

    from pipeline.registry.backbones import register_backbone as register
    from pipeline.registry.lineage import lineage_tags
    from pipeline.registry.store import TrackingConfig

    result = register(backbone.path, tracking_uri=tracking_uri, alias=alias or None)
    if not result.reused:
        client = TrackingConfig.resolve(result.tracking_uri).client()
        for key, value in lineage_tags(git_commit, kfp_run_id, kfp_run_name, kfp_pipeline_name).items():
            client.set_tag(result.run_id, key, value)
    state = "already registered as" if result.reused else "registered as"
    Path(registration.path).parent.mkdir(parents=True, exist_ok=True)
    Path(registration.path).write_text(
        f"Backbone {result.identity[:12]} {state} `{result.model_uri}` (MLflow run `{result.run_id}`).\n",
        encoding="utf-8",
    )
    registration.metadata.update(
        {"model_uri": result.model_uri, "run_id": result.run_id, "identity": result.identity, "reused": result.reused}
    )
    outputs = NamedTuple("BackboneRegistrationOutputs", [("model_name", str), ("model_version", str), ("run_id", str)])
    return outputs(result.model_name, result.version, result.run_id)


# --------------------------------------------------------------------------- factory

STEP_FUNCTIONS = (
    validate,
    ingest,
    preprocess,
    resolve_testset,
    split,
    resolve_backbone,
    allocate_ranks,
    finetune,
    evaluate,
    score_champion,
    register,
)


@dataclass(frozen=True)
class StepComponents:
    """The pipeline's components, all built on one image."""

    image: str
    validate: Callable[..., dsl.PipelineTask]
    ingest: Callable[..., dsl.PipelineTask]
    preprocess: Callable[..., dsl.PipelineTask]
    resolve_testset: Callable[..., dsl.PipelineTask]
    split: Callable[..., dsl.PipelineTask]
    resolve_backbone: Callable[..., dsl.PipelineTask]
    allocate_ranks: Callable[..., dsl.PipelineTask]
    finetune: Callable[..., dsl.PipelineTask]
    evaluate: Callable[..., dsl.PipelineTask]
    score_champion: Callable[..., dsl.PipelineTask]
    register: Callable[..., dsl.PipelineTask]


COMPARE_FUNCTIONS = (start_comparison, log_cell, summarize_comparison)
NETWORK_FUNCTIONS = (start_network, cross_site)


@dataclass(frozen=True)
class NetworkComponents:
    """The network run's own components (its sites reuse :class:`StepComponents`)."""

    start_network: Callable[..., dsl.PipelineTask]
    cross_site: Callable[..., dsl.PipelineTask]


def wrap(functions: Iterable[Callable[..., Any]], image: str | None = None) -> dict[str, Any]:
    """Each step function as a KFP component on ``image`` (default: :func:`default_image`), by name."""
    image = image or default_image()
    return {func.__name__: dsl.component(func, base_image=image, install_kfp_package=False) for func in functions}


def build_network_components(image: str | None = None) -> NetworkComponents:
    """Wrap the network run's steps as KFP components on ``image``."""
    return NetworkComponents(**wrap(NETWORK_FUNCTIONS, image))


@dataclass(frozen=True)
class CompareComponents:
    """The comparison's own components (its cells reuse :class:`StepComponents`)."""

    start_comparison: Callable[..., dsl.PipelineTask]
    log_cell: Callable[..., dsl.PipelineTask]
    summarize_comparison: Callable[..., dsl.PipelineTask]


def build_compare_components(image: str | None = None) -> CompareComponents:
    """Wrap the comparison's steps as KFP components on ``image``."""
    return CompareComponents(**wrap(COMPARE_FUNCTIONS, image))


def build_components(image: str | None = None) -> StepComponents:
    """Wrap every step as a KFP component on ``image`` (default: :func:`default_image`)."""
    image = image or default_image()
    return StepComponents(image=image, **wrap(STEP_FUNCTIONS, image))


PRETRAIN_FUNCTIONS = (validate_pretrain, pretrain_backbone, register_backbone)


@dataclass(frozen=True)
class PretrainComponents:
    """The pre-training pipeline's own components (its ingest / preprocess are :class:`StepComponents`')."""

    validate_pretrain: Callable[..., dsl.PipelineTask]
    pretrain_backbone: Callable[..., dsl.PipelineTask]
    register_backbone: Callable[..., dsl.PipelineTask]


def build_pretrain_components(image: str | None = None) -> PretrainComponents:
    """Wrap the pre-training pipeline's steps as KFP components on ``image``."""
    return PretrainComponents(**wrap(PRETRAIN_FUNCTIONS, image))
