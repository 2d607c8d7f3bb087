"""Where runs and models go: the MLflow store a command or step writes to.

The lowest module of :mod:`pipeline.registry` (no other registry module is imported here):
the tracking glue, the audit log and the test sets all open the store through
:class:`TrackingConfig`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlruns"


def default_tracking_uri(root: Path | None = None) -> str:
    """The local default: ``sqlite:///<root>/mlflow.db`` (root: the working directory)."""
    return f"sqlite:///{(root or Path.cwd()).absolute() / LOCAL_DB}"


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs and models go."""

    tracking_uri: str
    experiment_name: str = "cessl"
    model_name: str = "cessl-ecg"
    artifact_root: str | None = None  # new experiments' artifact location (local stores only)

    @classmethod
    def resolve(
        cls, tracking_uri: str = "", experiment_name: str = "cessl", model_name: str = "cessl-ecg"
    ) -> TrackingConfig:
        """Explicit URI, else ``$MLFLOW_TRACKING_URI``, else the local SQLite default."""
        uri = tracking_uri or os.environ.get(TRACKING_URI_ENV) or default_tracking_uri()
        artifact_root = None
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            artifact_root = (db.parent / LOCAL_ARTIFACTS).absolute().as_uri()
        return cls(uri, experiment_name or "cessl", model_name or "cessl-ecg", artifact_root)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def activate(self) -> None:
        """Point the fluent ``mlflow`` API at this store."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)


def ensure_experiment(config: TrackingConfig) -> str:
    """The experiment's id, created (with the local artifact root) when missing (also when a
    concurrent process creates it at the same moment)."""
    client = config.client()
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(config.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(config.experiment_name, artifact_location=config.artifact_root)
    except MlflowException:  # created meanwhile by a concurrent run
        experiment = client.get_experiment_by_name(config.experiment_name)
        if experiment is None:
            raise
        return experiment.experiment_id
