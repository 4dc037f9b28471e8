"""The pipeline: a stage's loop, the point-to-point transport between stages, gradient
averaging among replicas, process-group set-up and teardown, the partition of blocks into
stages, the runner of the modes that cannot be pipelined, and `build_stage` that assembles a
stage for a run or a benchmark. The hot loop is `stage.StageRunner.train_step`."""
