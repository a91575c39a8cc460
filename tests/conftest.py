import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter (set before triton is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist (`-n 2`) each worker takes one core's worth of threads, so the workers do not oversubscribe.
if os.environ.get("PYTEST_XDIST_WORKER") and torch.get_num_threads() > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

from nsa_compile.backend import _SLOT  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts and ends with an empty dynamo cache and no recorded video mask."""
    torch._dynamo.reset()
    _SLOT.recorded = None
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
