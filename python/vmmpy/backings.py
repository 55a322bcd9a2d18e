"""This host's own resources for the devices of a VM it receives or restores.

A migration peer's or a snapshot's config names disks and NICs by id only; the file or tap behind
each id, and the Unix socket the vsock device listens on, come from the destination's operator:
the VMM's command line (its defaults) or the receive / restore call (which replaces them). See
docs/security.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidConfig


def _string_map(value: object, name: str, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidConfig(f"{name}={value!r}: must map {what} (strings)")
    return dict(value)


@dataclass(frozen=True)
class HostBackings:
    disks: dict[str, str] = field(default_factory=dict)  # disk id -> image path
    net: dict[str, str] = field(default_factory=dict)  # net id -> tap name
    vsock_socket: str | None = None  # the vsock device's listening socket

    def overridden(self, disks: object = None, net: object = None, vsock_socket: object = None) -> HostBackings:
        """These backings with what a receive or restore call names (each replaces ours)."""
        if vsock_socket is not None and not isinstance(vsock_socket, str):
            raise InvalidConfig(f"vsock_socket={vsock_socket!r}: must be a path (a string)")
        return HostBackings(
            disks=self.disks if disks is None else _string_map(disks, "disks", "disk ids to paths"),
            net=self.net if net is None else _string_map(net, "net", "net ids to tap names"),
            vsock_socket=self.vsock_socket if vsock_socket is None else vsock_socket,
        )
