"""A run's files: checkpoints (every stage's part, the manifest, model.pt), weight snapshots for
time to accuracy, resume planning, and the run-directory lock (docs/checkpoints.md)."""
