"""Type stubs for vmmpy's native core (rust/python.rs)."""

MAX_VCPUS: int

def kvm_check() -> str:
    """Opens /dev/kvm and checks the API version; raises KvmError when KVM is unusable."""

def test_guest_elf() -> bytes:
    """The embedded test guest's ELF image."""

class Console:
    """The VMM's serial console backend; outlives the VMs attached to it."""
    def __init__(self, output_fd: int | None = None, keep_backlog: bool = False) -> None: ...
    def add_client(self, fd: int) -> None: ...
    def client_count(self) -> int: ...
    def push_input(self, data: bytes) -> None: ...
    def close(self) -> None: ...

class GuestRegion:
    """A read-only, zero-copy view of one guest RAM region (supports the buffer protocol)."""
    guest_address: int
    size: int
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int) -> memoryview: ...

class Vm:
    """A KVM VM with its payload loaded. No vCPU runs before boot()."""
    def __init__(self, *, memory_size: int, vcpus: int, kernel: bytes | None, initramfs: bytes | None,
                 cmdline: str, console: Console, reset_fd: int, guest_exit_fd: int, error_fd: int) -> None: ...
    def boot(self) -> None: ...
    def pause(self, timeout: float = 5.0) -> None:
        """Returns once every vCPU acknowledged (parked and ended vCPUs count); PauseTimeout otherwise."""
    def resume(self) -> None: ...
    def stop(self) -> None:
        """Ends and joins the vCPU threads, closes KVM fds, unmaps memory. Idempotent."""
    def lifecycle_request(self) -> str | None:
        """'reset' or 'shutdown': the first request any vCPU made."""
    def error(self) -> dict | None:
        """{'vcpu': int, 'reason': str, 'regs': {name: hex str}} of the first unhandled exit."""
    def vcpu_states(self) -> list[str]:
        """Per vCPU: 'created', 'running', 'paused', 'parked' or 'exited'."""
    @property
    def payload_kind(self) -> str:
        """'test-guest', 'elf' or 'bzimage'."""
    @property
    def cmdline(self) -> str: ...
    def memory_regions(self) -> list[GuestRegion]: ...
