import os
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SEED_ENV = "LOCALLOSS_PP_TEST_SEED"
_base_seed = 0


def pytest_configure(config):
    """Read LOCALLOSS_PP_TEST_SEED once, before any test: a bad value stops the run at once."""
    global _base_seed
    raw = os.environ.get(SEED_ENV, "0")
    try:
        _base_seed = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV}={raw!r}: expected an integer, e.g. {SEED_ENV}=3") \
            from None


@pytest.fixture(autouse=True)
def seeded(request):
    """Every test starts from generators seeded by its own name, so a test sees the same random
    inputs on every run and on every machine (the kernels that consume them may still differ:
    see tests/tolerances.py). LOCALLOSS_PP_TEST_SEED=k shifts every test's seed, to check that
    no test passes by the luck of one draw (the model code itself never reads these global
    generators: each block owns its own)."""
    seed = (_base_seed * 1_000_003 + zlib.crc32(request.node.nodeid.encode())) % 2**31
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


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
