"""A comparison's cell runs carry the code's commit as their parent does (``git_commit`` and
MLflow's ``mlflow.source.git.commit``), passed on through the parent's JSON hand-off."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from components.compare import CellResult, CompareGrid
from pipeline.registry.compare_tracking import ComparisonRun, log_cell_run, start_comparison
from pipeline.registry.lineage import lineage_tags
from pipeline.registry.store import TrackingConfig


def test_cell_runs_carry_the_parents_git_commit(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = TrackingConfig.resolve(uri, "lineage-compare")
    tags = {"git_commit": "0123abc+dirty", "data_version": "d1.dir", **lineage_tags("0123abc+dirty")}
    parent = start_comparison(config, "c1", CompareGrid(("cessl",), (0.5,), (0,)), {"r": 8}, tags)
    handed_on = ComparisonRun.read(parent.write(tmp_path / "comparison.json"))  # as the next step reads it
    result = CellResult("cessl", 0.5, 0, {"macro_f_beta": 0.5}, 1.0, 2.0, "rss", 3, 4, 5, "split", "test")
    cell = log_cell_run(config, handed_on, result)

    client = MlflowClient(tracking_uri=uri)
    for run_id in (parent.run_id, cell):
        run_tags = client.get_run(run_id).data.tags
        assert run_tags["mlflow.source.git.commit"] == "0123abc"
        assert run_tags["git_commit"] == "0123abc+dirty" and run_tags["data_version"] == "d1.dir"
