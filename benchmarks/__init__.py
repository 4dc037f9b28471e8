"""Throughput and time-to-accuracy benchmarks of localloss-pp against global backprop."""
