"""Hypothesis profiles of the fuzz tests.

``ci`` (default): a fixed, derandomized budget (the same examples every run) small enough that
all fuzz tests together take well under 90 s on a 2-core CPU under the Triton interpreter.
``long``: 15 times the examples, freshly random each run; select it with
``TK_FUZZ_PROFILE=long python -m pytest tests/fuzz``.

Each test states its ``ci`` example count through :func:`tests.fuzz.common.budget`; the profile
supplies everything else (and the multiplier). The profiles are applied per test, so they do not
change the settings of hypothesis tests elsewhere in the suite.
"""

import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "TK_FUZZ_PROFILE"
SCALE = {"ci": 1, "long": 15}

_common = dict(
    deadline=None,  # the interpreter's speed varies with the machine's load
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,  # a failure prints the line that reproduces it (@reproduce_failure)
)
settings.register_profile("ci", derandomize=True, database=None, **_common)
settings.register_profile("long", derandomize=False, **_common)

PROFILE = os.environ.get(PROFILE_ENV, "ci").strip() or "ci"
if PROFILE not in SCALE:
    raise ValueError(f"{PROFILE_ENV} must be one of {sorted(SCALE)}, got {PROFILE!r}")
