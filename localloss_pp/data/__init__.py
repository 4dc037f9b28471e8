"""Data: the dataset registry (built-in datasets, image folders, a user's own), the datasets
and the first stage's batch sources (augmentation on the device, the N-classes-per-batch
sampler, replica shards). A user's dataset imports what it needs from here (docs/usage.md,
"Your own data"):

    from localloss_pp.data import DatasetInfo, register_dataset
"""
from localloss_pp.data.registry import DatasetInfo, register_dataset, registered_datasets

__all__ = ["DatasetInfo", "register_dataset", "registered_datasets"]
