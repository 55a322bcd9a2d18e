"""What a migration receiver needs from its VMM. Apart from destination.py, so that the VMM can
implement it without importing the receiver (which a VMM that only boots never loads)."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: annotations only
if TYPE_CHECKING:
    from typing import Callable

    from ..config import VmConfig
    from .destination import Incoming


class ReceiveHooks:
    """What the receiver needs from its VMM (implemented by Vmm; runs on the VMM's control loop)."""

    def build_vm(self, cfg: VmConfig, memory_fds: list[int] | None) -> Incoming:
        raise NotImplementedError

    def complete(self, incoming: Incoming, fields: dict, commit: Callable[[], None]) -> None:
        """Takes the VM over and runs it; calls `commit()` on the control loop first, right before
        the VM is taken over (it raises if the receiver was closed: the VM is then not taken)."""
        raise NotImplementedError

    def emit(self, event: str, properties: dict | None = None) -> None:
        raise NotImplementedError
