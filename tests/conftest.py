import os

import pytest

from rnan_jax.env import default_data_dir


@pytest.fixture(scope="session")
def data_dir():
    """The shared SR data folder ($RNAN_DATA_DIR, default ../shared/data); skips when it is absent."""
    d = default_data_dir()
    if not os.path.isdir(os.path.join(d, "benchmark")):
        pytest.skip(f"SR data folder not found at {d} (set RNAN_DATA_DIR to the folder holding benchmark/ and train/)")
    return d
