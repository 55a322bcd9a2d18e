"""Type stubs for vmmpy's native core (rust/python.rs). Checked against the built module by
`python -m mypy.stubtest vmmpy._native` (in the test command)."""

from typing import final

__all__ = [
    "CHUNK_MAX",
    "CMD_MEMORY",
    "Console",
    "GuestRegion",
    "MAX_DISKS",
    "MAX_VCPUS",
    "Pacer",
    "RangeTable",
    "SavedState",
    "TlsChannel",
    "TlsContext",
    "Vm",
    "await_readable",
    "kvm_check",
    "parse_state",
    "test_guest_elf",
    "tune_socket",
    "wait_released",
]

MAX_VCPUS: int
MAX_DISKS: int
CMD_MEMORY: int  # the Memory frame's command number (rust/transfer.rs)
CHUNK_MAX: int  # the most RAM one Memory frame carries, in bytes

def kvm_check() -> str:
    """Opens /dev/kvm and checks the API version; raises KvmError when KVM is unusable."""

def await_readable(fd: int, spin: float) -> bool:
    """Polls the socket until it is readable, yielding between looks, for ``spin`` seconds at
    most (GIL released); False if that passed first."""

def tune_socket(fd: int) -> None:
    """Sets a migration socket's buffer sizes and TCP_NODELAY the way the transfer code wants."""

def test_guest_elf() -> bytes:
    """The embedded test guest's ELF image."""

def wait_released(timeout: float) -> bool:
    """Waits until every stopped VM's KVM fds and memory are released (a thread of the core
    closes them after ``Vm.stop(release_later=True)``: on kvm_pvm the kernel takes ~15 ms to
    destroy a VM); False if ``timeout`` seconds passed first."""

def parse_state(document: bytes) -> tuple[SavedState, bytes]:
    """A whole state document parsed: (its VM state, a JSON object of its other fields). A
    malformed native section raises InvalidConfig."""

@final
class SavedState:
    """A VM state parsed from a state document, ready for Vm.restore_state."""

@final
class Console:
    """The VMM's serial console backend; outlives the VMs attached to it."""
    def __new__(cls, output_fd: int | None = None, keep_backlog: bool = False) -> Console: ...
    def add_client(self, fd: int) -> None: ...
    def client_count(self) -> int: ...
    def push_input(self, data: bytes) -> int: ...
    def close(self) -> None: ...

@final
class GuestRegion:
    """A read-only, zero-copy view of one guest RAM region (supports the buffer protocol)."""

    guest_address: int
    size: int
    def __len__(self) -> int: ...

@final
class Vm:
    """A KVM VM with its payload loaded. No vCPU runs before boot()."""
    def __new__(
        cls,
        *,
        memory_size: int,
        vcpus: int,
        kernel: bytes | None,
        initramfs: bytes | None,
        cmdline: str,
        console: Console,
        reset_fd: int,
        guest_exit_fd: int,
        error_fd: int,
        restore: bool = False,
        memory_fds: list[int] | None = None,
        boot_protocol: str | None = None,
        disks: list[tuple[str, str, bool, bool]] = ...,
        nets: list[tuple[str, str | None, int | None, bytes, str | None, str | None]] = ...,
        vsock: tuple[str, int, int, str] | None = None,
        memory_shared: bool = True,
    ) -> Vm:
        """`restore`: built to take saved state (no payload loaded); `memory_fds`: map these
        sealed memfds as guest RAM (same-host migration) instead of new ones; `memory_shared`:
        new RAM as memfds (True) or private anonymous memory with transparent huge pages; `boot_protocol`
        'pvh' or 'linux64' (None: PVH for an ELF with the PVH note, else linux64); `disks`: (id,
        path, readonly, direct) per virtio-blk disk, opened before anything runs; `nets`: (id, tap
        name, tap fd, 6-byte MAC, ip, netmask) per virtio-net NIC (name or fd), its tap opened (or
        created, with ip/netmask) before anything runs; `vsock`: (id, cid, listening socket fd,
        its path) of the virtio-vsock device (the VM keeps a copy of the fd and removes the path
        when it goes)."""
    def boot(self, paused: bool = False) -> None: ...
    def pause(self, timeout: float = 5.0) -> None:
        """Returns once every vCPU acknowledged (parked and ended vCPUs count); PauseTimeout otherwise."""
    def stand_by(self) -> None:
        """The vCPUs held before their first entry wait spinning (a few ms at most) for resume()."""
    def resume(self) -> None: ...
    def stop(self, release_later: bool = False) -> None:
        """Ends and joins the vCPU threads, closes the devices, KVM fds and memory; with
        ``release_later`` the KVM fds and memory go on a thread of the core's own while the caller
        goes on (``wait_released``). Idempotent."""
    def lifecycle_request(self) -> str | None:
        """'reset' or 'shutdown': the first request any vCPU made."""
    def error(self) -> dict | None:
        """{'vcpu': int, 'reason': str, 'regs': {name: hex str}} of the first unhandled exit."""
    def power_button(self) -> None:
        """Latches the ACPI GED's power-button event and raises its interrupt (running or paused VM)."""
    def vcpu_states(self) -> list[str]:
        """Per vCPU: 'created', 'running', 'paused', 'parked' or 'exited'."""
    @property
    def payload_kind(self) -> str:
        """'test-guest', 'elf' or 'bzimage'."""
    @property
    def boot_protocol(self) -> str | None:
        """'pvh' or 'linux64' (how the BSP entered); None for a restored VM."""
    @property
    def cmdline(self) -> str: ...
    def inject_request(self, kind: str) -> None:
        """Records 'reset' or 'shutdown' as if a vCPU had asked, and writes its eventfd."""
    def counters(self) -> dict[str, dict[str, int]]:
        """{device id: {counter: value}}: virtio-net's rx/tx frames, bytes and drops."""
    def save_state(self) -> bytes:
        """The paused VM's state (all but memory): the state document's native sections (raw KVM
        structures and device registers) as one JSON object."""
    def restore_state(self, state: SavedState) -> None:
        """Loads a parsed state into a VM built with restore=True before any vCPU ran (not booted,
        or booted paused and not resumed since)."""
    def start_dirty_log(self) -> None: ...
    def stop_dirty_log(self) -> None: ...
    def dirty_ranges(self) -> RangeTable:
        """Pages written since the last call: KVM's log OR-ed with the VMM's own writes."""
    def all_ram_ranges(self) -> RangeTable: ...
    def memory_fds(self) -> list[tuple[int, int, int]]:
        """(guest address, fd, size) per RAM region; the fds stay the VM's. Private RAM
        (memory_shared=False) has none: InvalidConfig."""
    def save_memory(self, index: int, fd: int) -> None:
        """RAM region `index` into the open, empty file `fd` (sparse); the VM must be paused."""
    def load_memory(self, index: int, fd: int) -> None:
        """RAM region `index` from the open snapshot file `fd`, before the VM runs."""
    def memory_regions(self) -> list[GuestRegion]: ...
    def send_memory(
        self, link: int | TlsChannel, table: RangeTable, pacer: Pacer | None = None
    ) -> tuple[int, int, int]:
        """One Memory frame for `table` to a socket fd or a TlsChannel, straight from guest memory
        (GIL released), at most at `pacer`'s rate: (page bytes, pages with bytes, zero pages)."""
    def receive_memory(self, link: int | TlsChannel, table_len: int) -> tuple[int, int, int]:
        """The rest of a Memory frame whose header was read, into guest memory (GIL released)."""

@final
class TlsContext:
    """Mutual-TLS material of a tls_dir (Cloud Hypervisor's file names); InvalidConfig if unusable."""
    def __new__(cls, tls_dir: str, role: str) -> TlsContext:
        """`role`: 'client' (source: ca-cert.pem, client-cert.pem, client-key.pem) or 'server'
        (destination: ca-cert.pem, server-cert.pem, server-key.pem)."""
    def handshake(self, fd: int, timeout: float, server_name: str = ...) -> TlsChannel:
        """Handshake on a duplicate of socket `fd` within `timeout` s (GIL released); MigrationError
        if the peer's certificate does not chain to the CA (or, for a client, does not name
        `server_name`)."""

@final
class TlsChannel:
    """One TLS migration connection; every byte of it goes through here."""
    def sendall(self, data: bytes) -> None: ...
    def recv_exact(self, n: int, timeout: float | None = None) -> bytes: ...
    def close(self) -> None: ...

@final
class Pacer:
    """max_bandwidth shared by all connections of a migration; measures the send rate."""
    def __new__(cls, max_bandwidth: int) -> Pacer: ...
    @property
    def max_bandwidth(self) -> int: ...
    def rate(self) -> float:
        """Bytes/s let through over the last half second."""
    def cancel(self) -> None:
        """Senders waiting for the cap (and later ones) fail at once."""

@final
class RangeTable:
    """Guest-physical page ranges, kept in Rust."""
    @property
    def total_bytes(self) -> int: ...
    def __len__(self) -> int: ...
    def split(self, max_bytes: int) -> list[RangeTable]: ...
    def extend(self, other: RangeTable) -> None: ...
    def ranges(self) -> list[tuple[int, int]]: ...
