"""Watching a run: epoch statistics, the stage clock and log lines, TensorBoard, profiler
traces and timelines, plots, and the comparison of run directories."""
