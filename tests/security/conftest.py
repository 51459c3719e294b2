"""The Hypothesis profile of the security tests: bounded, reproducible, no deadline.

``derandomize=True`` makes every run (on CI too) draw the same examples, and no
example database is kept, so a failure here is reproduced by running the test again.
Each test picks its own ``max_examples`` from this profile; the whole package runs in
well under 30 s on two cores.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "dpatia-security",
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    # The HTTP tests share one module-scoped front door across examples on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: The profile, as a decorator: ``@PROFILE`` or ``@settings(PROFILE, max_examples=n)``.
PROFILE = settings.get_profile("dpatia-security")
