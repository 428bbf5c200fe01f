"""Shared pytest setup.

Torch runs with a fixed thread count, BLT_TEST_THREADS (default 1). The test models are tiny,
so a second thread gains little (~12% on an idle 2-core machine), while on a busy machine
OpenMP threads spinning against other processes made the suite ~7x slower (11 min vs 1.5 min
for test_causality + test_core). Set BLT_TEST_THREADS=2 on a dedicated machine if you like.
"""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("BLT_TEST_THREADS", "1")))


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test, restored afterwards."""
    from blt.tests.test_causality import deterministic_algorithms

    with deterministic_algorithms():
        yield
