import os
import signal

import pytest

from rnan_jax.env import default_data_dir, reuse_freed_memory

reuse_freed_memory()  # as the entry points do, before any test starts JAX: steps reuse freed memory


@pytest.fixture(autouse=True)
def _ctrl_c_deliverable():
    """A shell without job control starts `pytest ... &` (and nohup) with SIGINT ignored, which the processes the
    Ctrl-C tests start inherit through exec: those tests then hung or failed. Each test runs with Python's own
    Ctrl-C handler, so those processes start with the default one, as from a terminal."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="session")
def data_dir():
    """The shared SR data folder ($RNAN_DATA_DIR, default ../shared/data); skips when it is absent."""
    d = default_data_dir()
    if not os.path.isdir(os.path.join(d, "benchmark")):
        pytest.skip(f"SR data folder not found at {d} (set RNAN_DATA_DIR to the folder holding benchmark/ and train/)")
    return d


PEERS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peers"))


@pytest.fixture(scope="session")
def torch_rnan():
    """The PyTorch reading of RNAN (../shared/peers/rnan_torch.py); skips without torch or the file."""
    pytest.importorskip("torch", reason="PyTorch not installed (pip install torch==2.13.0 for the parity tests)")
    if not os.path.isfile(os.path.join(PEERS, "rnan_torch.py")):
        pytest.skip(f"PyTorch peer not found at {PEERS}/rnan_torch.py (../shared beside the repository)")
    import sys

    sys.path.insert(0, PEERS)
    try:
        import rnan_torch
    finally:
        sys.path.remove(PEERS)
    return rnan_torch.RNAN
