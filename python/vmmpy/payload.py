"""What a guest boots from: the kernel and initramfs *content* a VMM holds for its VM.

A VMM reads the files its own caller names (``--kernel``, ``vm.create``) once, when it first boots
the VM, and keeps the bytes: a reboot loads the same bytes again, and a migration or a snapshot
carries them as content, described by size and SHA-256. A destination or a restore never opens a
path a peer or a snapshot names (docs/security.md). ``kernel=None`` is the embedded test guest,
which needs nothing.
"""

from __future__ import annotations

import os
import stat

from .errors import InvalidConfig, PayloadError
from .record import Record

#: Kernel and initramfs together; a peer may not make a VMM hold more (nor more than guest RAM).
MAX_PAYLOAD_BYTES = 512 << 20
#: The parts, in the order of their index (a migration's Payload frame `arg`).
PARTS = ("kernel", "initramfs")


class BootPayload(Record):
    FIELDS = PARTS

    def __init__(self, kernel: bytes | None = None, initramfs: bytes | None = None):
        self.kernel, self.initramfs = kernel, initramfs

    def parts(self) -> dict[str, bytes]:
        return {name: data for name in PARTS if (data := getattr(self, name)) is not None}

    def describe(self) -> dict:
        """{part: {"size", "sha256"}} of the parts present: what a migration's Config and a
        snapshot's state document carry."""
        return {name: {"size": len(data), "sha256": _sha256_hex(data)} for name, data in self.parts().items()}

    @classmethod
    def read(cls, kernel: str | None, initramfs: str | None) -> "BootPayload":
        """Reads the files the VMM's own caller named (trusted paths), within the bound."""
        out: dict[str, bytes] = {}
        left = MAX_PAYLOAD_BYTES
        for name, path in (("kernel", kernel), ("initramfs", initramfs)):
            if path is None:
                continue
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    if not stat.S_ISREG(st.st_mode):
                        raise PayloadError(f"{name} {path}: not a regular file")
                    if st.st_size > left:
                        raise PayloadError(
                            f"{name} {path}: kernel and initramfs together exceed {MAX_PAYLOAD_BYTES >> 20} MiB"
                        )
                    out[name] = f.read(left + 1)
            except OSError as e:
                raise PayloadError(f"{name} {path}: {e.strerror}", e.errno) from None
            if len(out[name]) > left:
                raise PayloadError(f"{name} {path}: grew past the bound while it was read")
            left -= len(out[name])
        return cls(**out)


def check_description(desc, ram_bytes: int) -> dict[str, dict]:
    """A peer's (or snapshot's) payload description, checked before any byte of it is read:
    known parts, sizes within the bound and guest RAM, well-formed digests."""
    if desc is None:
        return {}
    if not isinstance(desc, dict) or set(desc) - set(PARTS):
        raise InvalidConfig(f"payload description must map {' / '.join(PARTS)} to size and sha256, got {desc!r}")
    total = 0
    for name, part in desc.items():
        if (
            not isinstance(part, dict)
            or set(part) != {"size", "sha256"}
            or type(part["size"]) is not int
            or not isinstance(part["sha256"], str)
            or len(part["sha256"]) != 64
            or part["size"] <= 0
            or any(c not in "0123456789abcdef" for c in part["sha256"])
        ):
            raise InvalidConfig(f"payload {name}: expected {{size: positive int, sha256: 64 hex digits}}")
        if part["size"] > ram_bytes:
            raise InvalidConfig(f"payload {name} of {part['size']} bytes is larger than guest RAM ({ram_bytes})")
        total += part["size"]
    if total > MAX_PAYLOAD_BYTES:
        raise InvalidConfig(f"payload of {total} bytes is over the bound of {MAX_PAYLOAD_BYTES}")
    return desc


def verify(name: str, data: bytes, expected: dict) -> None:
    if len(data) != expected["size"]:
        raise InvalidConfig(f"payload {name}: {len(data)} bytes, {expected['size']} described")
    if _sha256_hex(data) != expected["sha256"]:
        raise InvalidConfig(f"payload {name}: content does not match its sha256")


def _sha256_hex(data: bytes) -> str:
    import hashlib  # here, not at the top: ~3 ms of start-up, and only migrations and snapshots hash

    return hashlib.sha256(data).hexdigest()
