import pytest
import torch

from nsa_compile.backend import _SLOT


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    _SLOT.recorded = None
    yield
    torch._dynamo.reset()
