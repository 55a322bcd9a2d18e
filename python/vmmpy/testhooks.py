"""Test hooks: timing windows that the test suite must hit deliberately (a slow link, a request at
the very moment of the final pause, ...).

Absent by default. A :class:`TestHooks` is made once, by the caller that wants it (the test suite
through ``vmmpy --test-hooks SPEC``, or ``Vmm(test_hooks=TestHooks(...))``), handed to the VMM
explicitly, and logged as a warning when any hook is on. Nothing reads the environment.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields

from .options import parse_bool, parse_int, split_options
from .errors import InvalidConfig

log = logging.getLogger("vmmpy.testhooks")

REQUESTS = ("reset", "shutdown")


@dataclass(frozen=True)
class TestHooks:
    """Source side: ``frame_delay_ms`` (a slow link: each Memory frame waits this long),
    ``final_phase_delay_ms`` (a window between the switch to the final phase and the pause),
    ``complete_delay_ms`` (a window after the State was sent: before Complete, or before reading
    the answer to a State that completes), ``request_at_pause`` (a guest ``reset`` or
    ``shutdown`` request lands right as the final pause completes), ``keep_source``
    (after success the source keeps its VM, paused). Destination side: ``complete_paused`` (take
    over without resuming), ``no_lifecycle_capability`` (behave like a destination that cannot
    carry lifecycle events), ``answer_complete_after_close`` (with a lifecycle event carried,
    Complete is answered only once the receiver was closed, as when the VMM ends right after taking
    the VM over: a replayed power-off),
    ``request_on_arrival`` (a guest ``reset`` or ``shutdown`` request lands as the received vCPUs
    start, before the VMM has taken the VM over)."""

    __test__ = False  # not a pytest test class, despite its name

    frame_delay_ms: int = 0
    final_phase_delay_ms: int = 0
    complete_delay_ms: int = 0
    request_at_pause: str | None = None
    keep_source: bool = False
    complete_paused: bool = False
    no_lifecycle_capability: bool = False
    answer_complete_after_close: bool = False
    request_on_arrival: str | None = None

    def __post_init__(self) -> None:
        for name in ("request_at_pause", "request_on_arrival"):
            if getattr(self, name) not in (None, *REQUESTS):
                raise InvalidConfig(
                    f"test hook {name.replace('_', '-')}={getattr(self, name)!r}: expected reset or shutdown"
                )
        for name in ("frame_delay_ms", "final_phase_delay_ms", "complete_delay_ms"):
            if getattr(self, name) < 0:
                raise InvalidConfig(f"test hook {name.replace('_', '-')}: must not be negative")

    @classmethod
    def parse(cls, spec: str) -> "TestHooks":
        """``"frame-delay-ms=150,keep-source=on"`` → hooks; unknown names and bad values are refused."""
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for key, value in split_options(spec, "--test-hooks"):
            name = key.replace("-", "_")
            if name not in types or value is None:
                raise InvalidConfig(
                    f"--test-hooks {spec!r}: unknown hook or missing value in {key!r}; "
                    f"hooks: {', '.join(n.replace('_', '-') for n in types)}"
                )
            if types[name] == "bool":
                values[name] = parse_bool(value, f"--test-hooks {key}")
            elif types[name] == "int":
                values[name] = parse_int(value, f"--test-hooks {key}")
            else:
                values[name] = value
        return cls(**values)

    @property
    def active(self) -> dict[str, object]:
        """The hooks that are on (empty when none is)."""
        defaults = asdict(TestHooks())
        return {k: v for k, v in asdict(self).items() if v != defaults[k]}

    def announce(self) -> None:
        if self.active:
            log.warning("TEST HOOKS ACTIVE (never use in production): %s", self.active)


NO_HOOKS = TestHooks()
