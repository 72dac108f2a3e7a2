import hashlib
import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; triton reads this when a kernel is
# defined, so it must be set before any test module imports transfusion_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# An install-time setting (CI sets it so that `pip install -e` reuses the extension .ci/package
# compiled): the packaging tests run builds of their own, which must not inherit it.
os.environ.pop("TRANSFUSION_EXTENSION_FROM", None)


@pytest.fixture
def seed(request) -> int:
    """A seed derived from the test id: fresh inputs per case, reproducible per test."""
    s = int(hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8], 16)
    torch.manual_seed(s)
    return s
