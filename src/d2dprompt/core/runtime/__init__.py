"""What every stage runs on: the typed params, atomic outputs, checkpoints, MLflow tracking, torchrun processes, the CLI frame."""
