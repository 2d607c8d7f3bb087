"""Lineage is what ran: the parameters a run logs are the values its steps recorded they used
(splits.json, the rank map's metadata, adapter_config.json), not the values it was given."""

from __future__ import annotations

import json
import logging

from ml.data.splits import Splits
from pipeline.core.params import DEFAULTS
from pipeline.registry.lineage import lineage_tags, params_as_run, step_records


def write_step_outputs(tmp_path, *, labelled_ratio: float, seed: int, method: str, r: int, p: float, lr: float):
    """A split and an adapter folder as the split and finetune steps write them."""
    splits = Splits(
        test=["h/1"],
        train=["h/2"],
        valid=["h/3"],
        unlabelled=[],
        params={"labelled_ratio": labelled_ratio, "seed": seed, "test_ratio": 0.1, "valid_ratio": 0.2},
    )
    splits_path = splits.save(tmp_path / "splits.json")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"method": method, "r": r, "p": p, "extra": {"train_config": {"lr": lr, "seed": seed, "max_steps": 4}}}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return splits_path, adapter


def test_step_records_read_what_each_step_wrote(tmp_path):
    splits_path, adapter = write_step_outputs(
        tmp_path, labelled_ratio=0.5, seed=3, method="fixmatch", r=8, p=0.2, lr=1e-3
    )
    records = step_records(splits_path, adapter, {"r": 8.0, "compress": 0.5, "method": "fixmatch", "fingerprint": "x"})
    assert records == {
        "split": {"labelled_ratio": 0.5, "seed": 3},
        "finetune": {"method": "fixmatch", "lr": 1e-3, "seed": 3},
        "allocate-ranks": {"r": 8.0, "compress": 0.5, "method": "fixmatch"},
    }


def test_logged_params_are_the_steps_values_not_the_defaults(tmp_path, caplog):
    # the network's site runs were given the pipeline defaults (labelled_ratio 0.05) while
    # the split used the site's 0.5: what is logged is what the steps used
    splits_path, adapter = write_step_outputs(
        tmp_path, labelled_ratio=0.5, seed=3, method="fixmatch", r=8, p=0.2, lr=1e-3
    )
    given = DEFAULTS.replace(labelled_ratio=0.05, seed=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.registry.lineage"):
        logged = params_as_run(given, step_records(splits_path, adapter, {"r": "8.0", "compress": "0.25"}))
    assert (logged.labelled_ratio, logged.seed, logged.method, logged.r, logged.lr) == (0.5, 3, "fixmatch", 8, 1e-3)
    assert logged.p == given.p  # the adapter's own p (0 for a method without deactivation) is not the choice
    assert logged.compress == 0.25 and isinstance(logged.r, int)
    assert "labelled_ratio: the run was given 0.05 but step split used 0.5" in caplog.text

    # the same values: nothing to say, nothing changed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.registry.lineage"):
        assert params_as_run(logged, step_records(splits_path, adapter)) == logged
    assert not caplog.text


def test_lineage_tags_carry_the_bare_commit_and_drop_placeholders():
    tags = lineage_tags("0123abcd+dirty", "{{$.pipeline_job_uuid}}", "", "cessl-network")
    assert tags == {"mlflow.source.git.commit": "0123abcd", "kfp.pipeline_name": "cessl-network"}
    assert lineage_tags("unknown") == {}
