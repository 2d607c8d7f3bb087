"""The hospital network as one Kubeflow pipeline, ``cessl-network``: compiled or run locally.

    validate -> resolve_backbone (once) --+
    start_network (parent run, sites) ----+--> for each site (dsl.ParallelFor over ``sites``):
                                          |     ingest -> preprocess -> split -> allocate_ranks
                                          |       -> finetune (GPU) -> evaluate -> score_champion
                                          |       -> register (<model>-<site>, tags site / backbone / data version)
                                          |     and the baseline on that split: allocate_ranks -> finetune
                                          |       with plain LoRA (baseline-*; not registered)
                                          +--> cross_site (dsl.Collected: every adapter and the
                                               backbone on every site's test split, each site's
                                               LoRA baseline on its own -> parent run)

One shared backbone, one CE-SSL adapter per site (and its plain LoRA baseline, trained on the
same split for the comparison only). The sites are a *list parameter*
(``sites``: one dict per site, :func:`site_items`), so one compiled pipeline serves any
``sites.yaml``: ``cessl submit --sites`` / ``cessl schedule --sites`` pass the file's sites
as that parameter. A site's item carries its name, its registered model
(:func:`pipeline.registry.policy.site_model_name`), its source, data version and state folder,
and the parameters a site may override (:data:`pipeline.core.sites.OVERRIDABLE`); the other
parameters are the network's (pipeline parameters shared by every site).

Per-site caching: a site's data version is an input of its ingest, hence of the cache keys
of everything downstream; a site whose data did not change reuses its ingest ... evaluate
(no training) and its register step finds the identical registration (reused).

Failures: the CLI checks every site's source before the run; a site whose folder is missing
or unreadable is left out of the loop and reported failed, the others run. A site that fails
*at run time* (a step raising) fails its loop iteration: with ``kfp.local`` the other
iterations already running finish (their sites register), then the run ends without the
cross-site step and without outputs; on a Kubeflow backend the other iterations finish as
well and the loop's downstream (cross_site) does not run. ``cessl run --sites`` then reports,
from MLflow (the ``cessl.network_id`` tag), which sites registered and which failed.

No ``from __future__ import annotations``: KFP reads the pipeline function's annotations.
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kfp import dsl

from pipeline.core.params import DEFAULTS, PipelineParams
from pipeline.core.sites import OVERRIDABLE, Site
from pipeline.dags.finetune import (
    ALLOCATE_RANKS,
    BACKBONE,
    FINETUNE,
    INGEST,
    PREPROCESS,
    REGISTER,
    RESOLVE_TESTSET,
    SCORE_CHAMPION,
    SPLIT,
    VALIDATE,
    CompileOptions,
    ExtraParameter,
    SharedInputs,
    add_backbone,
    add_data,
    add_registered_model,
    add_training,
    add_validate,
    configure_tasks,
    item_field,
    loop_dag,
    loop_parameters,
    shared_arguments,
    site_choices,
)
from pipeline.dags.tasks import NetworkComponents, StepComponents, build_components, build_network_components
from pipeline.registry.policy import registered_model_name, site_model_name

log = logging.getLogger(__name__)

NETWORK_PIPELINE_NAME = "cessl-network"
# A site's own values (its loop item); the rest of PipelineParams are the network's.
SITE_PARAMS: tuple[str, ...] = ("source", "data_version", "state_dir", *OVERRIDABLE)
ITEM_KEYS: tuple[str, ...] = ("name", "model_name", *SITE_PARAMS)
START, CROSS_SITE = "start-network", "cross-site"
# Each site also trains this baseline on its split (display names: BASELINE_PREFIX + the steps')
BASELINE_METHOD = "lora"
BASELINE_PREFIX = "baseline-"


@dataclass(frozen=True)
class NetworkSettings:
    """What a network pipeline is compiled with besides the cluster settings.

    ``parallelism``: sites trained at once (0: no limit; ``kfp.local`` runs at most a few);
    ``sites``: the default list parameter (a run passes its own)."""

    parallelism: int = 0
    sites: tuple[Mapping[str, Any], ...] = ()
    defaults: PipelineParams = DEFAULTS


def site_item(site: Site, base: PipelineParams, state_dir: str = "", data_version: str = "") -> dict[str, Any]:
    """One site's loop item: its name, registered model, source, data version, state folder
    and the overridable parameters (``base`` with the site's overrides, validated)."""
    params = site.params(base)
    model = site_model_name(registered_model_name(base.model_name, params.method), site.name)
    item = {"name": site.name, "model_name": model}
    item |= {k: getattr(params, k) for k in SITE_PARAMS}
    item |= {"state_dir": state_dir or params.state_dir, "data_version": data_version or params.data_version}
    return item


def site_items(
    sites: Sequence[Site], base: PipelineParams, state_root: str = "", data_versions: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """The ``sites`` parameter: one item per site; each its own state folder ``<state_root>/sites/<name>``
    (an incremental ingest's state is per source, a site's never mixes with another's)."""
    versions = dict(data_versions or {})
    return [
        site_item(
            site,
            base,
            state_dir=str(Path(state_root) / "sites" / site.name) if state_root else "",
            data_version=versions.get(site.name, ""),
        )
        for site in sites
    ]


def loop_parameters_of(settings: NetworkSettings) -> list[ExtraParameter]:
    """``sites`` (one item per site, :data:`ITEM_KEYS`) and ``network_id``."""
    return loop_parameters(
        "sites",
        [dict(s) for s in settings.sites],
        f"the sites, one item each ({', '.join(ITEM_KEYS)}): a site's source, data version and overrides; "
        "`cessl submit --sites sites.yaml` passes a site registry's",
        "network_id",
        "the network run's id (MLflow tag cessl.network_id of every site's run)",
    )


def network_arguments(params: PipelineParams, items: Sequence[Mapping[str, Any]], network_id: str) -> dict[str, Any]:
    """The network pipeline's arguments for a run."""
    return shared_arguments(params, SITE_PARAMS) | {"sites": [dict(i) for i in items], "network_id": network_id}


def build_network_pipeline(
    settings: NetworkSettings | None = None,
    options: CompileOptions | None = None,
    steps: StepComponents | None = None,
    network_steps: NetworkComponents | None = None,
):
    """The ``@dsl.pipeline`` function of the network (reads top-down as the DAG)."""
    settings = settings or NetworkSettings()
    options = options or CompileOptions()
    steps = steps or build_components(options.image)
    network_steps = network_steps or build_network_components(options.image)

    def cessl_network(run: SimpleNamespace) -> Any:
        validate = add_validate(steps, run)
        backbone = add_backbone(steps, run, validate)
        shared = shared_arguments(run, SITE_PARAMS)
        start = network_steps.start_network(
            sites=run.sites, params=shared, network_id=run.network_id, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER
        )
        start.after(validate)
        # Only artifacts and pipeline parameters cross into the loop (kfp.local 2.17 replaces
        # an outer task's output *parameter* by the loop item).
        with dsl.ParallelFor(run.sites, parallelism=settings.parallelism) as site:
            ingest, preprocess = add_data(steps, site, after=start, site=item_field(site, "name"))
            inputs = SharedInputs(ingest, preprocess, backbone, validate)
            model = add_registered_model(
                steps,
                run,
                inputs,
                # kfp.local 2.17 resolves no loop-item field nested in a dict: the whole item
                # goes as `site`, and register lays its values over these
                params={**shared, "data_version": ingest.outputs["data_version"]},
                pipeline_name=NETWORK_PIPELINE_NAME,
                site=site,
                after=start,
                network_id=run.network_id,
            )
            # the site's plain LoRA adapter, trained on its CE-SSL chain's split (the same records,
            # the same frozen test set), never registered: the cross-site step compares the two
            baseline_ranks, baseline = add_training(
                steps,
                SimpleNamespace(**(vars(run) | site_choices(site))),
                inputs,
                model.chain.split,
                method=BASELINE_METHOD,
                labelled_ratio=site.labelled_ratio,
                seed=site.seed,
                site=item_field(site, "name"),
            )
        cross = network_steps.cross_site(
            network=start.outputs["network"],
            backbone_model=backbone.outputs["backbone_model"],
            stores=dsl.Collected(preprocess.outputs["store"]),
            splits=dsl.Collected(model.chain.split.outputs["splits"]),
            adapters=dsl.Collected(model.chain.finetune.outputs["adapter"]),
            baselines=dsl.Collected(baseline.outputs["adapter"]),
            registrations=dsl.Collected(model.register.outputs["registration"]),
            tracking_uri=run.tracking_uri,
            experiment_name=run.experiment_name,
        )
        configure_tasks(
            options,
            {
                VALIDATE: validate,
                BACKBONE: backbone,
                START: start,
                INGEST: ingest,
                PREPROCESS: preprocess,
                **model.tasks(),
                BASELINE_PREFIX + ALLOCATE_RANKS: baseline_ranks,
                BASELINE_PREFIX + FINETUNE: baseline,
                CROSS_SITE: cross,
            },
            # MLflow side effects, or state that changes outside (champion, frozen test set)
            uncached=(START, RESOLVE_TESTSET, SCORE_CHAMPION, REGISTER, CROSS_SITE),
            credentials=(
                INGEST,
                BACKBONE,
                START,
                RESOLVE_TESTSET,
                SPLIT,
                SCORE_CHAMPION,
                REGISTER,
                CROSS_SITE,
            ),
        )
        return cross.outputs["Output"]

    return loop_dag(
        NETWORK_PIPELINE_NAME,
        "CE-SSL hospital network: one backbone, one adapter per site (registered as <model>-<site>), "
        "and the cross-site matrix on one MLflow parent run.",
        cessl_network,
        settings.defaults,
        options,
        exclude=SITE_PARAMS,
        extra=loop_parameters_of(settings),
    )
