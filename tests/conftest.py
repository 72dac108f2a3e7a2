import hashlib

import pytest
import torch


@pytest.fixture
def seed(request) -> int:
    """A seed derived from the test id: fresh inputs per case, reproducible per test."""
    s = int(hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8], 16)
    torch.manual_seed(s)
    return s
