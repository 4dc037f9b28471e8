"""A run's files: checkpoints (every stage's part, the manifest, model.pt), resume planning, and
the run-directory lock (docs/checkpoints.md)."""
