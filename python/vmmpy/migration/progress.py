"""What `vm.migration-progress` reports. Names follow QEMU's `query-migrate` (snake_case) where
QEMU has the fact, so dashboards built on it map over directly."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class MigrationProgress:
    status: str = "setup"  # setup | active | completed | failed | cancelled
    phase: str = "starting"  # starting | memory-fds | precopy | completing | state-sent | done
    destination_url: str = ""
    local: bool = False
    iteration: int = 0  # QEMU's dirty-sync-count
    total: int = 0  # guest RAM bytes
    transferred: int = 0  # page bytes sent
    remaining: int = 0  # bytes of the current iteration not yet sent
    normal: int = 0  # pages sent with their bytes
    duplicate: int = 0  # zero pages, sent as ranges without bytes
    mbps: float = 0.0  # measured link bandwidth, megabits/s
    max_bandwidth: int = 0  # the cap, bytes/s over all connections (QEMU's max-bandwidth); 0 = none
    current_rate: float = 0.0  # bytes/s sent over the last half second
    connections: int = 1
    tls: bool = False
    dirty_pages_rate: float = 0.0  # pages/s dirtied during the last iteration
    cpu_throttle_percentage: int = 0
    downtime_configured_ms: int = 300
    expected_downtime_ms: float | None = None
    downtime_ms: float | None = None  # measured, pause → destination running
    total_time_ms: float | None = None
    error: str | None = None
    lifecycle_event: str | None = None  # a guest reboot/power-off latched during this migration
    lifecycle_event_phase: str | None = None  # the phase it arrived in
    lifecycle_replayed_on: str | None = None  # "destination" | "source"
    started_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)


class ProgressTracker:
    """The worker updates; API threads read a consistent copy."""

    def __init__(self, **initial):
        self._lock = threading.Lock()
        self._p = MigrationProgress(**initial)
        # Figures measured elsewhere (the native pacer's rate), read at each snapshot.
        self.live: Callable[[], dict] | None = None

    def update(self, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self._p, k, v)

    def add(self, **deltas) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self._p, k, getattr(self._p, k) + v)

    def snapshot(self) -> dict:
        with self._lock:
            d = self._p.to_dict()
        if self.live is not None and d["status"] == "active":
            d.update(self.live())
        return d

    def get(self, name: str):
        with self._lock:
            return getattr(self._p, name)
