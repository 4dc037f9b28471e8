"""Data: the datasets (torchvision's and the embedded mnist5k) and the first stage's batch
sources (augmentation on the device, the N-classes-per-batch sampler, replica shards)."""
