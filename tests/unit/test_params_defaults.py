"""The values the command line writes down so that it starts without torch or kfp, pinned to
their sources: PipelineParams' model and training defaults and choices (the ``ml``
dataclasses), compare's excluded parameters and the cluster flags' documented defaults
(``pipeline.dags``)."""

from __future__ import annotations

import argparse

from ml.model.backbone import BACKBONE_CONFIGS
from ml.model.lora import LoRAConfig
from ml.model.rank_allocation import RankAllocationConfig
from ml.train import methods, precision
from ml.train.config import EPOCHS, HEAD_INITS, TrainConfig
from pipeline.core import params
from pipeline.core.params import DEFAULTS


def test_the_ml_choices_and_defaults_are_the_ml_dataclasses():
    assert tuple(BACKBONE_CONFIGS) == params.BACKBONE_NAMES
    assert params.METHOD_NAMES == methods.METHOD_NAMES
    assert params.DEFAULT_METHOD == methods.DEFAULT_METHOD
    assert params.PRECISION_CHOICES == precision.PRECISION_CHOICES
    assert params.EPOCHS == EPOCHS
    assert params.HEAD_INITS == HEAD_INITS
    lora, allocation, train = LoRAConfig(), RankAllocationConfig(), TrainConfig()
    assert (DEFAULTS.r, DEFAULTS.p, DEFAULTS.compress) == (lora.r, lora.p, allocation.compress)
    assert (DEFAULTS.seed, DEFAULTS.max_steps, DEFAULTS.lr, DEFAULTS.val_every, DEFAULTS.precision) == (
        train.seed,
        train.max_steps,
        train.lr,
        train.val_every,
        train.precision,
    )
    assert (DEFAULTS.method, DEFAULTS.epochs) == (methods.DEFAULT_METHOD, EPOCHS)
    assert DEFAULTS.head_init == train.head_init
    assert DEFAULTS.replace(head_init="random").train_config().head_init == "random"


def test_the_builders_still_make_the_ml_dataclasses():
    assert DEFAULTS.lora_config() == LoRAConfig(r=DEFAULTS.r, p=DEFAULTS.p)
    assert DEFAULTS.allocation_config().compress == DEFAULTS.compress
    assert DEFAULTS.train_config().epochs == EPOCHS and DEFAULTS.resolved_batch_size == 64


def test_compare_excludes_what_the_compare_pipeline_excludes():
    from pipeline.cli.verbs import COMPARE_EXCLUDED
    from pipeline.dags.compare import EXCLUDED_PARAMS

    assert COMPARE_EXCLUDED == EXCLUDED_PARAMS


def test_the_cluster_flags_document_the_compile_options_defaults(monkeypatch):
    """An unset cluster flag keeps CompileOptions' default, and its help names that default."""
    for name in ("CESSL_CHECKPOINT_PVC", "CESSL_CREDENTIALS_SECRET", "CESSL_MLFLOW_SECRET"):
        monkeypatch.delenv(name, raising=False)
    from pipeline.cli.options import add_cluster_settings
    from pipeline.dags.finetune import CompileOptions

    parser = argparse.ArgumentParser()
    add_cluster_settings(parser)
    helps = {a.dest: a.help or "" for a in parser._actions}
    defaults = CompileOptions()
    for dest in ("checkpoint_pvc", "credentials_secret", "mlflow_secret", "config_map"):
        assert getattr(defaults, dest) in helps[dest], dest
    assert f"default: {defaults.finetune_resources.cpu_limit})" in helps["finetune_cpu_limit"]


def test_unset_cluster_flags_compile_the_default_options(monkeypatch):
    from pipeline import cli
    from pipeline.cli.run import compile_options
    from pipeline.dags.finetune import CompileOptions

    for name in ("CESSL_CHECKPOINT_PVC", "CESSL_CREDENTIALS_SECRET", "CESSL_MLFLOW_SECRET", "CESSL_IMAGE"):
        monkeypatch.delenv(name, raising=False)
    assert compile_options(cli.build_parser().parse_args(["compile"])) == CompileOptions()
    given = cli.build_parser().parse_args(["compile", "--checkpoint-pvc", "", "--config-map", "cm"])
    assert (compile_options(given).checkpoint_pvc, compile_options(given).config_map) == ("", "cm")
