"""CE-SSL pipeline: the Kubeflow DAG, the `cessl` command line and the MLflow glue."""
