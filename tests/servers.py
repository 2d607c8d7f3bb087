"""Real servers for integration tests (S3, MLflow). Filled in by the infrastructure work."""
