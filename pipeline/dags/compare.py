"""The method comparison as one Kubeflow pipeline, ``cessl-compare``: compiled or run locally.

    ingest -> preprocess --------+
    resolve_backbone ------------+--> for each cell of the grid (dsl.ParallelFor):
    start_comparison (parent run)-+     split -> allocate_ranks -> finetune (GPU) -> evaluate -> log_cell
                                  +--> summarize_comparison (dsl.Collected cells: table + plot -> parent run)

The data and the backbone are resolved once; every cell (method x labelled ratio x seed,
:class:`components.compare.CompareGrid`) is the fine-tune DAG's own chain
(:func:`pipeline.dags.finetune.add_finetune_chain`), so a cell trains exactly as ``cessl run`` would,
and every cell draws the test cut with the grid's first seed (``test_seed``): every method,
labelled ratio and seed is tested on the same records, so differences between cells are
paired (``components.compare.paired_differences``); the cells of one (ratio, seed) also share
their training split. ``log_cell`` writes each cell as an MLflow child run of the
comparison's parent run; nothing is registered (cells are experiments). The cluster settings
are the fine-tune DAG's (:func:`pipeline.dags.finetune.configure_tasks`: GPU request, tolerations,
checkpoint volume on every finetune task).

The pipeline's parameters are :class:`pipeline.core.params.PipelineParams` without the fields a
cell chooses (method, labelled_ratio, seed) and ``model_name``, plus ``grid`` (the cells, a
list of ``{"method", "labelled_ratio", "seed"}``) and ``comparison_id``.

No ``from __future__ import annotations``: KFP reads the pipeline function's annotations.
"""

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from kfp import dsl

from components.compare import GRID_FIELDS, CompareGrid
from pipeline.core.params import DEFAULTS, PipelineParams
from pipeline.dags.finetune import (
    CompileOptions,
    ExtraParameter,
    add_finetune_chain,
    add_shared_inputs,
    configure_tasks,
    loop_dag,
    loop_parameters,
    shared_arguments,
)
from pipeline.dags.tasks import CompareComponents, StepComponents, build_compare_components, build_components

log = logging.getLogger(__name__)

COMPARE_PIPELINE_NAME = "cessl-compare"
# PipelineParams fields the comparison does not take: the cells choose these, and nothing is registered.
EXCLUDED_PARAMS: tuple[str, ...] = (*GRID_FIELDS, "model_name", "frozen_testset")  # cells: fresh, shared splits
START, LOG_CELL, SUMMARIZE = "start-comparison", "log-cell", "summarize-comparison"


@dataclass(frozen=True)
class CompareSettings:
    """What a comparison pipeline is compiled with besides the cluster settings.

    ``grid``: the default cells (a run may pass others). ``parallelism``: cells trained at
    once (0: no limit; ``kfp.local`` runs at most 2). Locally 1 keeps ms/step comparable on
    shared CPUs.
    """

    grid: CompareGrid
    parallelism: int = 0
    defaults: PipelineParams = DEFAULTS


def loop_parameters_of(settings: CompareSettings) -> list[ExtraParameter]:
    """``grid`` (one item per cell) and ``comparison_id``."""
    return loop_parameters(
        "grid",
        settings.grid.items(),
        f"the cells to train, one item each ({', '.join(GRID_FIELDS)}): every method x labelled ratio x seed",
        "comparison_id",
        "the comparison's id (MLflow tag of its parent run and cells)",
    )


def compare_arguments(params: PipelineParams, grid: CompareGrid, comparison_id: str) -> dict[str, Any]:
    """The comparison pipeline's arguments for a run."""
    return shared_arguments(params, EXCLUDED_PARAMS) | {"grid": grid.items(), "comparison_id": comparison_id}


def build_compare_pipeline(
    settings: CompareSettings,
    options: CompileOptions | None = None,
    steps: StepComponents | None = None,
    compare_steps: CompareComponents | None = None,
):
    """The ``@dsl.pipeline`` function of the comparison (reads top-down as the DAG)."""
    options = options or CompileOptions()
    steps = steps or build_components(options.image)
    compare_steps = compare_steps or build_compare_components(options.image)

    def cessl_compare(run: SimpleNamespace) -> Any:
        inputs = add_shared_inputs(steps, run)
        shared = shared_arguments(run, EXCLUDED_PARAMS)
        start = compare_steps.start_comparison(
            grid=run.grid,
            params=shared | {"data_version": inputs.ingest.outputs["data_version"]},
            comparison_id=run.comparison_id,
        )
        comparison = start.outputs["comparison"]
        # Only artifacts and pipeline parameters cross into the loop (kfp.local 2.17 replaces
        # an outer task's output *parameter* by the loop item).
        with dsl.ParallelFor(run.grid, parallelism=settings.parallelism) as cell:
            chain = add_finetune_chain(
                steps,
                run,
                inputs,
                method=cell.method,
                labelled_ratio=cell.labelled_ratio,
                seed=cell.seed,
                test_seed=cell.test_seed,
            )
            logged = compare_steps.log_cell(
                comparison=comparison,
                splits=chain.split.outputs["splits"],
                adapter=chain.finetune.outputs["adapter"],
                curves=chain.finetune.outputs["curves"],
                evaluation=chain.evaluate.outputs["evaluation"],
                method=cell.method,
                labelled_ratio=cell.labelled_ratio,
                seed=cell.seed,
                test_seed=cell.test_seed,
                tracking_uri=run.tracking_uri,
                experiment_name=run.experiment_name,
            )
        summary = compare_steps.summarize_comparison(
            comparison=comparison,
            cells=dsl.Collected(logged.output),
            tracking_uri=run.tracking_uri,
            experiment_name=run.experiment_name,
        )
        configure_tasks(
            options,
            {**inputs.tasks(), START: start, **chain.tasks(), LOG_CELL: logged, SUMMARIZE: summary},
            uncached=(START, LOG_CELL, SUMMARIZE),  # MLflow side effects
            credentials=(*inputs.tasks(), START, LOG_CELL, SUMMARIZE),
        )
        return summary.outputs["Output"]

    return loop_dag(
        COMPARE_PIPELINE_NAME,
        "Compare training methods (methods x labelled ratios x seeds) on the same splits; "
        "one MLflow parent run with a child run per cell, a table and a plot.",
        cessl_compare,
        settings.defaults,
        options,
        exclude=EXCLUDED_PARAMS,
        extra=loop_parameters_of(settings),
    )
