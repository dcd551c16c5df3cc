"""The operator side: the ServerApp, MLflow tracking, checkpoints and the factoryfed CLI."""
