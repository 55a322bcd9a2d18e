"""What a migration receiver needs from its VMM. Apart from destination.py, so that the VMM can
implement it without importing the receiver (which a VMM that only boots never loads)."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: annotations only
if TYPE_CHECKING:
    from typing import Callable

    from ..config import VmConfig
    from .destination import Incoming


class ReceiveHooks:
    """What the receiver needs from its VMM (implemented by its Reception; called on the receiver's thread)."""

    def build_vm(self, cfg: VmConfig, memory_fds: list[int] | None) -> Incoming:
        """An empty VM to receive into; the VMM stays reserved for it until complete or discard."""
        raise NotImplementedError

    def discard(self, incoming: Incoming) -> None:
        """The attempt failed: stops its VM and frees the VMM for another."""
        raise NotImplementedError

    def complete(
        self, incoming: Incoming, fields: dict, commit: Callable[[], None], answer: Callable[[], None]
    ) -> None:
        """Runs the VM here and takes it over; calls `commit()` first (it raises if the receiver
        was closed: the VM is then not taken), and `answer()` (Ok to the source) once the guest
        runs or, with a lifecycle event to replay, once it has been taken over."""
        raise NotImplementedError

    def emit(self, event: str, properties: dict | None = None) -> None:
        raise NotImplementedError
