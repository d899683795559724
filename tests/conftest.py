import os
import sys
from pathlib import Path

import pytest
import torch

# tests import their helpers (tiny.py) as plain modules
sys.path.insert(0, str(Path(__file__).parent))

# Under xdist each worker is a torch process with one OpenMP thread per core by default: two
# workers on two cores oversubscribe them, and OpenMP threads spin waiting for a descheduled
# partner (steps 10-25x slower, measured in session 12's training runs). Give each worker its
# share of the cores, and the subprocesses the tests start (ldm train / distill / batch) the same.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(min(torch.get_num_threads(), int(os.environ["OMP_NUM_THREADS"])))


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    """A tiny random SD 1.x-shaped diffusers folder (eps, PNDM config with steps_offset=1)."""
    from tiny import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("tiny_sd1"), "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    """A tiny random SD 2.x-shaped diffusers folder (v-prediction, linear proj, upcast)."""
    from tiny import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("tiny_sd2"), "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny random SDXL-shaped diffusers folder (text_time U-Net, two CLIP encoders, Euler)."""
    from tiny import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory) -> Path:
    """A tiny random SDXL-refiner-shaped folder (second encoder only, aesthetic score ids)."""
    from tiny import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl_refiner"), refiner=True, seed=1)
