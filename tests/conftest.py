import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_data_dir():
    """Folder with the official MNIST/FashionMNIST raw files (env LOCALLOSS_PP_DATA_DIR)."""
    root = os.environ.get("LOCALLOSS_PP_DATA_DIR")
    if not root or not Path(root, "MNIST", "raw").is_dir():
        pytest.skip("set LOCALLOSS_PP_DATA_DIR to a folder holding MNIST/raw/*.gz to run this")
    return Path(root)


@pytest.fixture(scope="session")
def mnist_copy(shared_data_dir, tmp_path_factory):
    """A writable copy of the real MNIST raw files (the shared folder may be read-only)."""
    dst = tmp_path_factory.mktemp("realdata")
    shutil.copytree(shared_data_dir / "MNIST" / "raw", dst / "MNIST" / "raw")
    return dst
