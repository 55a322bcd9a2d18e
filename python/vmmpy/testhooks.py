"""Test hooks: timing windows that the test suite must hit deliberately (a slow link, a request at
the very moment of the final pause, ...). Off unless VMMPY_TEST_HOOKS is set in the environment."""

from __future__ import annotations

import os


def hooks_from_env() -> dict[str, str]:
    """Test hooks, from VMMPY_TEST_HOOKS="name=value,...". Source side: `request-at-pause=reset|
    shutdown` (a lifecycle request lands right as the final pause completes), `frame-delay-ms=N`
    (a slow link: each Memory frame waits N ms), `final-phase-delay-ms=N` (a window between the
    switch to the final phase and the pause), `complete-delay-ms=N` (a window between State and
    Complete), `keep-source=1` (after success the source keeps its VM, paused). Destination side:
    `complete-paused=1` (take over without resuming), `no-lifecycle-capability=1` (behave like a
    destination that cannot carry lifecycle events)."""
    hooks = {}
    for item in os.environ.get("VMMPY_TEST_HOOKS", "").split(","):
        key, sep, value = item.partition("=")
        if sep:
            hooks[key] = value
    return hooks


def hook(name: str) -> str | None:
    return hooks_from_env().get(name)
