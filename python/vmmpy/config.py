"""VM configuration.

Three ways in, one representation out:

* the records :class:`VmConfig` and :class:`SerialConfig` (what :class:`vmmpy.vmm.Vmm` consumes);
* :meth:`VmConfig.from_api`, which reads the ``VmConfig`` JSON body of Cloud Hypervisor's
  ``PUT /api/v1/vm.create`` and refuses, by name, every field vmmpy cannot honour;
* ``parse_*`` helpers for the command-line flags, in Cloud Hypervisor's ``key=value,...`` syntax
  (split and typed by :mod:`vmmpy.options`).

Every problem is reported as :class:`vmmpy.errors.InvalidConfig` whose message names the field (or
flag) and the offending value.
"""

from __future__ import annotations

import os
import stat

from vmmpy.errors import InvalidConfig
from vmmpy.options import parse_bool, parse_int, parse_options, parse_size, split_options
from vmmpy.record import Record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms of start-up): annotations only
if TYPE_CHECKING:
    from typing import Any

KIB = 1 << 10
MIB = 1 << 20

MIN_MEMORY_MIB = 64
MIN_VCPUS = 1
MAX_VCPUS = 8
DEFAULT_MEMORY_MIB = 512
DEFAULT_CMDLINE = "console=ttyS0"
#: How the BSP enters the kernel: Xen's PVH entry (an ELF with the PVH note) or Linux's 64-bit
#: entry. Unset: PVH when the ELF has the note (as Cloud Hypervisor does), else linux64.
BOOT_PROTOCOLS = ("pvh", "linux64")

#: Serial back-ends vmmpy implements, spelled as Cloud Hypervisor's ``ConsoleMode`` enum.
SERIAL_MODES = ("Off", "Null", "Tty", "File", "Socket")
#: ``console`` (virtio-console) modes vmmpy accepts: both mean "no virtio console", which is all
#: vmmpy has.
CONSOLE_MODES = ("Off", "Null")


def host_memory_mib() -> int:
    """Physical memory of this host in MiB: the upper bound for a guest's RAM."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and page_size > 0:
            return pages * page_size // MIB
    except (ValueError, OSError):
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // KIB
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 20  # unknown host: 1 TiB, effectively no bound


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _format_mib(mib: int) -> str:
    if mib % KIB == 0:
        return f"{mib // KIB} GiB"
    return f"{mib} MiB"


# --------------------------------------------------------------------------------------------
# Records (on the `vmmpy` command's boot path: plain classes, see vmmpy.record)
# --------------------------------------------------------------------------------------------


class SerialConfig(Record):
    """Where the guest's COM1 goes.

    ``mode`` is one of :data:`SERIAL_MODES`: ``Off`` (no UART at all), ``Null`` (UART present,
    output dropped), ``Tty`` (the VMM's stdin/stdout), ``File`` (output appended to ``file``),
    ``Socket`` (a Unix socket at ``socket`` that the VMM listens on).
    """

    FIELDS = ("mode", "file", "socket")

    def __init__(self, mode: str = "Null", file: str | None = None, socket: str | None = None):
        # Accept any capitalisation of a known mode ("null", "FILE") and store the canonical one.
        if isinstance(mode, str):
            mode = next((known for known in SERIAL_MODES if mode.lower() == known.lower()), mode)
        self.mode, self.file, self.socket = mode, file, socket
        self.validate()

    def problems(self, prefix: str = "serial") -> list[str]:
        out: list[str] = []
        if self.mode not in SERIAL_MODES:
            out.append(
                f"{prefix}.mode={self.mode!r}: unsupported serial mode; expected one of {', '.join(SERIAL_MODES)}"
            )
            return out
        for name in ("file", "socket"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or "\0" in value):
                out.append(f"{prefix}.{name}={value!r}: must be a non-empty path")
        if self.mode == "File" and not self.file:
            out.append(f"{prefix}.file={self.file!r}: mode File needs a file path")
        if self.mode == "Socket" and not self.socket:
            out.append(f"{prefix}.socket={self.socket!r}: mode Socket needs a socket path")
        if self.mode != "File" and self.file is not None:
            out.append(f"{prefix}.file={self.file!r}: only valid with mode File (mode is {self.mode})")
        if self.mode != "Socket" and self.socket is not None:
            out.append(f"{prefix}.socket={self.socket!r}: only valid with mode Socket (mode is {self.mode})")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise InvalidConfig("; ".join(problems))

    def to_api(self) -> dict:
        """Cloud Hypervisor's ``SerialConfig`` shape (unset paths omitted, as CH does)."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.file is not None:
            out["file"] = self.file
        if self.socket is not None:
            out["socket"] = self.socket
        return out


#: Disks per VM (the native core's limit too: PCI slots, BAR window, GSIs).
MAX_DISKS = 16


class DiskConfig(Record):
    """A virtio-blk disk (Cloud Hypervisor's ``DiskConfig``): a raw image file. ``id=None`` gets
    ``disk<i>`` from its place in :attr:`VmConfig.disks`."""

    FIELDS = ("path", "readonly", "id", "direct")

    def __init__(self, path: str, readonly: bool = False, id: str | None = None, direct: bool = False):
        self.path, self.readonly, self.id, self.direct = path, readonly, id, direct

    def problems(self, label: str) -> list[str]:
        out = []
        for name in ("readonly", "direct"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{label}.{name}={getattr(self, name)!r}: must be a boolean")
        if self.id is not None and (
            not isinstance(self.id, str) or not self.id or "\0" in self.id or len(self.id.encode()) > 255
        ):
            out.append(f"{label}.id={self.id!r}: must be a non-empty string")
        path = self.path
        if not isinstance(path, str) or not path or "\0" in path:
            out.append(f"{label}.path={path!r}: must be a non-empty path")
        elif not os.path.exists(path):
            out.append(f"{label}.path={path!r}: no such file")
        elif not (os.path.isfile(path) or stat.S_ISBLK(os.stat(path).st_mode)):
            out.append(f"{label}.path={path!r}: not a regular file")
        elif not os.access(path, os.R_OK if self.readonly else os.R_OK | os.W_OK):
            out.append(f"{label}.path={path!r}: not {'readable' if self.readonly else 'readable and writable'}")
        return out

    def to_api(self) -> dict:
        return {"path": self.path, "readonly": self.readonly, "direct": self.direct, "id": self.id}


def _check_disks(disks: Any, label: str) -> list[str]:
    if not isinstance(disks, list) or not all(isinstance(d, DiskConfig) for d in disks):
        return [f"{label}={disks!r}: must be a list of DiskConfig"]
    out: list[str] = []
    if len(disks) > MAX_DISKS:
        out.append(f"{label}: {len(disks)} disks, at most {MAX_DISKS}")
    seen: set[str] = set()
    for i, d in enumerate(disks):
        out.extend(d.problems(f"{label}[{i}]"))
        if d.id in seen:
            out.append(f"{label}[{i}].id={d.id!r}: used by another disk")
        seen.add(d.id)
    return out


#: NICs per VM (the native core's limit too).
MAX_NETS = 8
#: Linux's IFNAMSIZ less its NUL.
MAX_TAP_NAME = 15
_IFF_TAP = 0x0002
_IFF_MULTI_QUEUE = 0x0100
_CAP_NET_ADMIN = 12


def random_mac() -> str:
    """A locally administered unicast MAC, as Cloud Hypervisor gives a NIC without one."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def parse_mac(text: Any) -> bytes | None:
    """``"52:54:00:12:34:56"`` -> its 6 bytes; None when it is not a unicast MAC."""
    if not isinstance(text, str):
        return None
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        return None
    octets = bytes(int(p, 16) for p in parts)
    return None if octets[0] & 1 else octets


def _may_create_taps() -> bool:
    """CAP_NET_ADMIN in this process's effective set (what creating a tap needs)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def tap_problem(name: str) -> str | None:
    """Why this host cannot give vmmpy the tap `name` (None: it can, as far as can be told before
    opening it): an interface of that name that is not a single-queue tap, or none and no right to
    create it. The open at boot catches the rest (a tap another process holds)."""
    sys_dir = os.path.join("/sys/class/net", name)
    if os.path.exists(sys_dir):
        try:
            with open(os.path.join(sys_dir, "tun_flags"), encoding="ascii") as f:
                flags = int(f.read().strip(), 16)
        except (OSError, ValueError):
            return "an interface that is not a tap"
        if not flags & _IFF_TAP:
            return "a tun device, not a tap"
        if flags & _IFF_MULTI_QUEUE:
            return "a multi-queue tap (vmmpy uses one queue pair)"
        return None
    if not os.path.exists("/dev/net/tun"):
        return "no such tap, and this host has no /dev/net/tun to create one"
    if not _may_create_taps():
        return "no such tap, and this process may not create one (needs CAP_NET_ADMIN)"
    return None


class NetConfig(Record):
    """A virtio-net NIC on a host tap (Cloud Hypervisor's ``NetConfig``): ``tap`` by name (created
    when it does not exist, with ``ip``/``mask`` as its host address; ``mask`` defaults to
    255.255.255.0, as in Cloud Hypervisor), or ``fd``, an open tap
    descriptor (in-process and command line only: an HTTP body cannot carry one) that stays the
    caller's: vmmpy never closes it, and takes a duplicate of its own each time it builds the VM
    (create, every reboot), closed with that VM instance; so it must stay open while the VM may
    reboot. The duplicate shares its open file description: vmmpy makes it non-blocking, sets
    its vnet header size and turns its offloads off, for the caller's descriptor too. ``mac=None`` gets a random one, kept for the VM's life (reboots, migrations);
    ``id=None`` gets ``net<i>`` from its place in :attr:`VmConfig.net`."""

    FIELDS = ("tap", "mac", "ip", "mask", "id", "fd")

    def __init__(
        self,
        tap: str | None = None,
        mac: str | None = None,
        ip: str | None = None,
        mask: str | None = None,
        id: str | None = None,
        fd: int | None = None,
    ):
        self.tap, self.ip, self.mask, self.id, self.fd = tap, ip, mask, id, fd
        self.mac = random_mac() if mac is None else mac

    def problems(self, label: str) -> list[str]:
        out = []
        if (self.tap is None) == (self.fd is None):
            out.append(f"{label}: needs exactly one of tap (a name) and fd")
        if self.tap is not None:
            tap = self.tap
            if (
                not isinstance(tap, str)
                or not tap
                or len(tap.encode()) > MAX_TAP_NAME
                or any(c in tap for c in "/\0 \t\n")
            ):
                out.append(f"{label}.tap={tap!r}: must be an interface name of 1 to {MAX_TAP_NAME} bytes")
            else:
                why = tap_problem(tap)
                if why:
                    out.append(f"{label}.tap={tap!r}: {why}")
        if self.fd is not None:
            if not _is_int(self.fd) or self.fd < 0:
                out.append(f"{label}.fd={self.fd!r}: must be an open file descriptor")
            else:
                try:
                    os.fstat(self.fd)
                except OSError:
                    out.append(f"{label}.fd={self.fd}: not an open file descriptor")
        if parse_mac(self.mac) is None:
            out.append(f"{label}.mac={self.mac!r}: must be a unicast MAC address (xx:xx:xx:xx:xx:xx)")
        for name in ("ip", "mask"):
            value = getattr(self, name)
            if value is None:
                continue
            import ipaddress  # only a NIC with an address needs it: kept off the boot path

            try:
                ipaddress.IPv4Address(value)
            except (ValueError, TypeError):
                out.append(f"{label}.{name}={value!r}: must be an IPv4 address")
        if self.mask is not None and not out:
            try:
                ipaddress.IPv4Network(f"0.0.0.0/{self.mask}")
            except ValueError:
                out.append(f"{label}.mask={self.mask!r}: not a netmask")
        if self.id is not None and (
            not isinstance(self.id, str) or not self.id or "\0" in self.id or len(self.id.encode()) > 255
        ):
            out.append(f"{label}.id={self.id!r}: must be a non-empty string")
        return out

    def to_api(self) -> dict:
        out: dict[str, Any] = {"mac": self.mac, "id": self.id}
        if self.tap is not None:
            out["tap"] = self.tap
        if self.ip is not None:
            out["ip"] = self.ip
        if self.mask is not None:
            out["mask"] = self.mask
        return out

    def native(self) -> tuple:
        """What the native VM takes: (id, tap, fd, mac bytes, ip, mask)."""
        return (self.id, self.tap, self.fd, parse_mac(self.mac), self.ip, self.mask)


def _check_nets(nets: Any, label: str, disks: Any) -> list[str]:
    if not isinstance(nets, list) or not all(isinstance(n, NetConfig) for n in nets):
        return [f"{label}={nets!r}: must be a list of NetConfig"]
    out: list[str] = []
    if len(nets) > MAX_NETS:
        out.append(f"{label}: {len(nets)} NICs, at most {MAX_NETS}")
    # Device ids name device state in a migration: unique across disks and NICs.
    seen = {d.id for d in disks if isinstance(d, DiskConfig)}
    taps: set[str] = set()
    for i, n in enumerate(nets):
        out.extend(n.problems(f"{label}[{i}]"))
        if n.id in seen:
            out.append(f"{label}[{i}].id={n.id!r}: used by another device")
        seen.add(n.id)
        if n.tap is not None and n.tap in taps:
            out.append(f"{label}[{i}].tap={n.tap!r}: used by another NIC")
        taps.add(n.tap)
    return out


#: Cloud Hypervisor's id for the (only) vsock device when its config names none.
VSOCK_DEFAULT_ID = "_vsock0"
#: Guest CIDs: 0-2 are the hypervisor's, the local and the host's; 2^32-1 is VMADDR_CID_ANY.
VSOCK_MIN_CID = 3
VSOCK_MAX_CID = (1 << 32) - 2
#: sun_path, NUL included.
_UNIX_PATH_MAX = 108


class VsockConfig(Record):
    """The virtio-vsock device (Cloud Hypervisor's ``VsockConfig``): the guest's CID and the Unix
    socket vmmpy listens on for host connections (``CONNECT <port>``); a guest connection to host
    port P goes to ``<socket>_P``. ``id=None`` gets :data:`VSOCK_DEFAULT_ID`."""

    FIELDS = ("cid", "socket", "id")

    def __init__(self, cid: int, socket: str, id: str | None = None):
        self.cid, self.socket, self.id = cid, socket, id

    def problems(self, label: str) -> list[str]:
        out = []
        if not _is_int(self.cid) or not VSOCK_MIN_CID <= self.cid <= VSOCK_MAX_CID:
            out.append(f"{label}.cid={self.cid!r}: must be an integer from {VSOCK_MIN_CID} to {VSOCK_MAX_CID}")
        if self.id is not None and (
            not isinstance(self.id, str) or not self.id or "\0" in self.id or len(self.id.encode()) > 255
        ):
            out.append(f"{label}.id={self.id!r}: must be a non-empty string")
        out.extend(vsock_socket_problems(self.socket, f"{label}.socket"))
        return out

    def to_api(self) -> dict:
        return {"cid": self.cid, "socket": self.socket, "id": self.id}


def vsock_socket_problems(path: Any, label: str) -> list[str]:
    """What is wrong with `path` as the vsock device's listening socket (checked again when it is
    bound: a live socket there is refused, a stale one replaced)."""
    if not isinstance(path, str) or not path or "\0" in path:
        return [f"{label}={path!r}: must be a non-empty path"]
    if len(os.fsencode(path)) >= _UNIX_PATH_MAX:
        return [f"{label}={path!r}: longer than a Unix socket path can be ({_UNIX_PATH_MAX - 1} bytes)"]
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        return [f"{label}={path!r}: no such directory {parent!r}"]
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        return [f"{label}={path!r}: exists and is not a socket"]
    return []


# Field labels used in error messages: the record field names, or Cloud Hypervisor's JSON paths.
_FIELD_LABELS = {
    "memory_mib": "memory_mib",
    "vcpus": "vcpus",
    "kernel": "kernel",
    "initramfs": "initramfs",
    "cmdline": "cmdline",
    "boot_protocol": "boot_protocol",
    "memory_shared": "memory_shared",
    "serial": "serial",
    "disks": "disks",
    "net": "net",
    "vsock": "vsock",
}
_API_LABELS = {
    "memory_mib": "memory.size",
    "vcpus": "cpus.boot_vcpus",
    "kernel": "payload.kernel",
    "initramfs": "payload.initramfs",
    "cmdline": "payload.cmdline",
    "boot_protocol": "payload.boot_protocol",
    "memory_shared": "memory.shared",
    "serial": "serial",
    "disks": "disks",
    "net": "net",
    "vsock": "vsock",
}


def _check_vm_fields(
    *,
    memory_mib: Any,
    vcpus: Any,
    kernel: Any,
    initramfs: Any,
    cmdline: Any,
    memory_shared: Any,
    serial: Any,
    api: bool,
    boot_protocol: Any = None,
    disks: Any = (),
    net: Any = (),
    vsock: Any = None,
) -> list[str]:
    """Every problem with these VmConfig field values, as messages naming field and value."""
    labels = _API_LABELS if api else _FIELD_LABELS
    out: list[str] = []

    def shown_memory() -> str:
        # The API speaks bytes; show the value the client sent.
        if api and _is_int(memory_mib):
            return str(memory_mib * MIB)
        return repr(memory_mib)

    if not _is_int(vcpus) or not MIN_VCPUS <= vcpus <= MAX_VCPUS:
        out.append(f"{labels['vcpus']}={vcpus!r}: must be an integer from {MIN_VCPUS} to {MAX_VCPUS}")

    if not _is_int(memory_mib):
        out.append(f"{labels['memory_mib']}={memory_mib!r}: must be an integer")
    elif memory_mib < MIN_MEMORY_MIB:
        out.append(f"{labels['memory_mib']}={shown_memory()}: must be at least {MIN_MEMORY_MIB} MiB")
    else:
        bound = host_memory_mib()
        if memory_mib > bound:
            out.append(f"{labels['memory_mib']}={shown_memory()}: more than this host's memory ({_format_mib(bound)})")

    if not isinstance(memory_shared, bool):
        out.append(f"{labels['memory_shared']}={memory_shared!r}: must be a boolean")

    for name, value in (("kernel", kernel), ("initramfs", initramfs)):
        if value is None:
            continue
        label = labels[name]
        if not isinstance(value, str) or not value or "\0" in value:
            out.append(f"{label}={value!r}: must be a non-empty path")
        elif not os.path.exists(value):
            out.append(f"{label}={value!r}: no such file")
        elif not os.path.isfile(value):
            out.append(f"{label}={value!r}: not a regular file")
        elif not os.access(value, os.R_OK):
            out.append(f"{label}={value!r}: not readable")

    if cmdline is not None and (not isinstance(cmdline, str) or "\0" in cmdline):
        out.append(f"{labels['cmdline']}={cmdline!r}: must be a string without NUL bytes")

    if boot_protocol is not None and boot_protocol not in BOOT_PROTOCOLS:
        out.append(f"{labels['boot_protocol']}={boot_protocol!r}: must be one of {', '.join(BOOT_PROTOCOLS)}")
    if not isinstance(serial, SerialConfig):
        out.append(f"{labels['serial']}={serial!r}: must be a SerialConfig")
    else:
        out.extend(serial.problems())
    out.extend(_check_disks(list(disks), labels["disks"]))
    out.extend(_check_nets(list(net), labels["net"], list(disks)))
    if vsock is not None:
        if not isinstance(vsock, VsockConfig):
            out.append(f"{labels['vsock']}={vsock!r}: must be a VsockConfig")
        else:
            out.extend(vsock.problems(labels["vsock"]))
            others = [d.id for d in disks if isinstance(d, DiskConfig)] + [
                n.id for n in net if isinstance(n, NetConfig)
            ]
            if vsock.id in others:
                out.append(f"{labels['vsock']}.id={vsock.id!r}: used by another device")
    return out


class VmConfig(Record):
    """What vmmpy needs to build a VM.

    ``kernel=None`` boots the embedded test guest; ``cmdline=None`` means :data:`DEFAULT_CMDLINE`;
    ``boot_protocol=None`` enters an ELF with the PVH note through PVH (see :data:`BOOT_PROTOCOLS`).
    ``memory_shared``: guest RAM as memfds mapped shared (the default; a same-host ``local=on``
    migration passes them), or with False private anonymous memory with transparent huge pages
    (Cloud Hypervisor's ``shared=off``: faster to fault in, no same-host migration).
    """

    FIELDS = (
        "memory_mib",
        "vcpus",
        "kernel",
        "initramfs",
        "cmdline",
        "memory_shared",
        "serial",
        "boot_protocol",
        "disks",
        "net",
        "vsock",
    )

    def __init__(
        self,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        vcpus: int = 1,
        kernel: str | None = None,
        initramfs: str | None = None,
        cmdline: str | None = None,
        memory_shared: bool = True,
        serial: SerialConfig | None = None,
        boot_protocol: str | None = None,
        disks: list[DiskConfig] | None = None,
        net: list[NetConfig] | None = None,
        vsock: VsockConfig | None = None,
    ):
        self.memory_mib, self.vcpus, self.memory_shared = memory_mib, vcpus, memory_shared
        self.kernel, self.initramfs, self.cmdline, self.boot_protocol = kernel, initramfs, cmdline, boot_protocol
        self.serial = SerialConfig() if serial is None else serial
        # Default ids follow the devices' order, as the guest sees them on the PCI bus.
        disks = [] if disks is None else disks
        if isinstance(disks, list):
            disks = [
                d.replace(id=f"disk{i}") if isinstance(d, DiskConfig) and d.id is None else d
                for i, d in enumerate(disks)
            ]
        net = [] if net is None else net
        if isinstance(net, list):
            net = [
                n.replace(id=f"net{i}") if isinstance(n, NetConfig) and n.id is None else n for i, n in enumerate(net)
            ]
        if isinstance(vsock, VsockConfig) and vsock.id is None:
            vsock = vsock.replace(id=VSOCK_DEFAULT_ID)
        self.disks, self.net, self.vsock = disks, net, vsock
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidConfig` naming every bad field (call again after mutating)."""
        problems = _check_vm_fields(
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            kernel=self.kernel,
            initramfs=self.initramfs,
            cmdline=self.cmdline,
            memory_shared=self.memory_shared,
            serial=self.serial,
            api=False,
            boot_protocol=self.boot_protocol,
            disks=self.disks,
            net=self.net,
            vsock=self.vsock,
        )
        if problems:
            raise InvalidConfig("; ".join(problems))

    @property
    def effective_cmdline(self) -> str:
        """The command line the guest gets (before the VMM appends its own parameters)."""
        return DEFAULT_CMDLINE if self.cmdline is None else self.cmdline

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    # ---------------------------------------------------------------- Cloud Hypervisor JSON

    @classmethod
    def from_api(cls, body: Any) -> "VmConfig":
        """Parse a Cloud Hypervisor ``VmConfig`` body (already decoded from JSON).

        Fields vmmpy cannot honour are refused together, by path, e.g.
        ``unsupported VmConfig fields: disks, memory.hugepages``.
        """
        return _parse_api_vm_config(body)

    def to_api(self) -> dict:
        """This config in Cloud Hypervisor's ``VmConfig`` shape (used by ``vm.info``).

        Unset optional values are omitted, as Cloud Hypervisor does; the result is accepted by
        :meth:`from_api` and yields an equal config.
        """
        payload: dict[str, Any] = {}
        if self.kernel is not None:
            payload["kernel"] = self.kernel
        if self.initramfs is not None:
            payload["initramfs"] = self.initramfs
        payload["cmdline"] = self.effective_cmdline
        if self.boot_protocol is not None:
            payload["boot_protocol"] = self.boot_protocol  # a vmmpy extension of CH's PayloadConfig
        out = {
            "cpus": {"boot_vcpus": self.vcpus, "max_vcpus": self.vcpus},
            "memory": {"size": self.memory_mib * MIB, "shared": self.memory_shared},
            "payload": payload,
            "serial": self.serial.to_api(),
            "console": {"mode": "Off"},
        }
        if self.disks:
            out["disks"] = [d.to_api() for d in self.disks]
        if self.net:
            out["net"] = [n.to_api() for n in self.net]
        if self.vsock is not None:
            out["vsock"] = self.vsock.to_api()
        return out


# --------------------------------------------------------------------------------------------
# Cloud Hypervisor VmConfig bodies
# --------------------------------------------------------------------------------------------

# Fields vmmpy does not implement but accepts when they carry Cloud Hypervisor's default value.
#
# Why: Cloud Hypervisor serializes its whole VmConfig, defaults included, in `vm.info`'s
# `config`, and configs handed to `ch-remote create` are routinely made from that output (or
# from CH's own documentation examples, which spell these defaults out). Each value below asks
# for exactly what Cloud Hypervisor does when the key is absent, and vmmpy already accepts the
# key being absent, so accepting the spelled-out default changes nothing. Any other value is
# refused by name. Besides this table, a JSON `null` anywhere and an empty list for a list-valued
# field are read as "not set" (Cloud Hypervisor's own reading of null for optional fields).
#
#   top level : iommu=false, watchdog=false, pvpanic=false, landlock_enable=false, gdb=false,
#               rng={"src": "/dev/urandom"} (CH's implicit default entropy device; vmmpy adds
#               none, exactly as when `rng` is absent),
#               debug_console={"mode": "Off", ...} (any iobase: the port is off)
#   cpus      : kvm_hyperv=false, max_phys_bits=46, nested=true, core_scheduling="Vm",
#               profile="Host", features={} or {"amx": false}
#   memory    : mergeable=false, hotplug_method="Acpi", hugepages=false, prefault=false,
#               reserve=false, thp=true
#   serial    : iommu=false
#   console   : iommu=false, pci_segment=0 (mode itself must be Off or Null)
#   PCI common fields of rng/console (id=null, iommu=false, pci_segment=0, pci_device_id=null)
#
# libvirt's CH driver sends none of these; it sends payload, cpus.boot_vcpus/max_vcpus,
# memory.size, serial/console modes, and devices/disks/net when the domain has them (refused).
_TOP_DEFAULTS: dict[str, Any] = {
    "iommu": False,
    "watchdog": False,
    "pvpanic": False,
    "landlock_enable": False,
    "gdb": False,
}
_CPUS_DEFAULTS: dict[str, Any] = {
    "kvm_hyperv": False,
    "max_phys_bits": 46,
    "nested": True,
    "core_scheduling": "Vm",
    "profile": "Host",
}
_MEMORY_DEFAULTS: dict[str, Any] = {
    "mergeable": False,
    "hotplug_method": "Acpi",
    "hugepages": False,
    "prefault": False,
    "reserve": False,
    "thp": True,
}
_PCI_COMMON_DEFAULTS: dict[str, Any] = {"iommu": False, "pci_segment": 0}
#   disks[i]  : iommu=false, num_queues=1, queue_size=128, vhost_user=false, pci_segment=0,
#               backing_files=false, sparse=true, image_type="Raw" (vmmpy's disks are raw images
#               on one queue; its queue's maximum size is 256, the driver picks the size)
_DISK_DEFAULTS: dict[str, Any] = {
    "iommu": False,
    "num_queues": 1,
    "queue_size": 128,
    "vhost_user": False,
    "pci_segment": 0,
    "backing_files": False,
    "sparse": True,
    "image_type": "Raw",
}
#   net[i]    : iommu=false, num_queues=2, queue_size=256, vhost_user=false, vhost_mode="Client",
#               pci_segment=0 (one rx/tx pair, 256 entries at most, the driver picks the size);
#               offload_tso/offload_ufo/offload_csum=true or false: vmmpy offers no offloads
#               (docs/devices.md), which changes how fast, never what, the guest sends
_NET_DEFAULTS: dict[str, Any] = {
    "iommu": False,
    "num_queues": 2,
    "queue_size": 256,
    "vhost_user": False,
    "vhost_mode": "Client",
    "pci_segment": 0,
}
_NET_OFFLOADS = ("offload_tso", "offload_ufo", "offload_csum")
_RNG_DEFAULT_SRC = "/dev/urandom"


def _unset(value: Any) -> bool:
    """A value that requests nothing: JSON null or an empty list."""
    return value is None or (isinstance(value, list) and not value)


def _same(value: Any, default: Any) -> bool:
    # JSON true must not compare equal to 1, nor false to 0.
    return type(value) is type(default) and value == default


def _parse_api_vm_config(body: Any) -> VmConfig:
    if not isinstance(body, dict):
        raise InvalidConfig(f"VmConfig body must be a JSON object, not {type(body).__name__}")

    unsupported: list[str] = []
    problems: list[str] = []

    def section(name: str) -> dict:
        value = body.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.append(f"{name}={value!r}: must be an object")
            return {}
        return value

    def leftovers(prefix: str, sub: dict, handled: set[str], defaults: dict[str, Any]) -> None:
        for key, value in sub.items():
            if key in handled or _unset(value):
                continue
            if key in defaults and _same(value, defaults[key]):
                continue
            unsupported.append(f"{prefix}.{key}")

    def path_value(label: str, value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            problems.append(f"{label}={value!r}: must be a string")
            return None
        return value

    # payload -----------------------------------------------------------------------------
    payload = section("payload")
    kernel = path_value("payload.kernel", payload.get("kernel"))
    initramfs = path_value("payload.initramfs", payload.get("initramfs"))
    cmdline = payload.get("cmdline")
    if cmdline is not None and not isinstance(cmdline, str):
        problems.append(f"payload.cmdline={cmdline!r}: must be a string")
        cmdline = None
    boot_protocol = payload.get("boot_protocol")
    leftovers("payload", payload, {"kernel", "initramfs", "cmdline", "boot_protocol"}, {})

    # cpus --------------------------------------------------------------------------------
    cpus = section("cpus")
    boot = cpus.get("boot_vcpus")
    max_vcpus = cpus.get("max_vcpus")
    if boot is None:
        boot = max_vcpus if max_vcpus is not None else 1
    if not _is_int(boot):
        problems.append(f"cpus.boot_vcpus={boot!r}: must be an integer")
    if max_vcpus is not None:
        if not _is_int(max_vcpus):
            problems.append(f"cpus.max_vcpus={max_vcpus!r}: must be an integer")
        elif _is_int(boot) and max_vcpus != boot:
            problems.append(
                f"cpus.max_vcpus={max_vcpus!r}: vCPU hotplug is not supported, must equal cpus.boot_vcpus ({boot})"
            )
    handled_cpus = {"boot_vcpus", "max_vcpus"}
    features = cpus.get("features")
    if isinstance(features, dict) and all(
        key == "amx" and (value is None or _same(value, False)) for key, value in features.items()
    ):
        handled_cpus.add("features")  # {} or {"amx": false}: CH's default CPU features
    leftovers("cpus", cpus, handled_cpus, _CPUS_DEFAULTS)

    # memory ------------------------------------------------------------------------------
    memory = section("memory")
    size = memory.get("size")
    memory_mib: Any = DEFAULT_MEMORY_MIB
    if size is not None:
        if not _is_int(size) or size <= 0:
            problems.append(f"memory.size={size!r}: must be a positive integer (bytes)")
        elif size % MIB:
            problems.append(f"memory.size={size}: must be a multiple of 1 MiB ({MIB} bytes)")
        else:
            memory_mib = size // MIB
    shared = memory.get("shared")
    if shared is None:
        shared = True  # vmmpy's default (Cloud Hypervisor's is false): local=on works without it
    elif not isinstance(shared, bool):
        problems.append(f"memory.shared={shared!r}: must be a boolean")
        shared = True
    leftovers("memory", memory, {"size", "shared"}, _MEMORY_DEFAULTS)

    # serial ------------------------------------------------------------------------------
    serial = SerialConfig()
    serial_body = section("serial")
    if serial_body:
        mode = serial_body.get("mode")
        if mode is None:
            problems.append("serial.mode=None: required when serial is given")
        elif mode == "Pty":
            problems.append(f"serial.mode={mode!r}: not supported by vmmpy; expected one of {', '.join(SERIAL_MODES)}")
        elif mode not in SERIAL_MODES:
            problems.append(f"serial.mode={mode!r}: unknown mode; expected one of {', '.join(SERIAL_MODES)}")
        else:
            candidate = SerialConfig.__new__(SerialConfig)
            candidate.mode = mode
            candidate.file = serial_body.get("file")
            candidate.socket = serial_body.get("socket")
            serial_problems = candidate.problems()
            if serial_problems:
                problems.extend(serial_problems)
            else:
                serial = SerialConfig(mode, candidate.file, candidate.socket)
        leftovers("serial", serial_body, {"mode", "file", "socket"}, {"iommu": False})

    # console (virtio-console) ------------------------------------------------------------
    console = section("console")
    if console:
        mode = console.get("mode")
        if mode not in CONSOLE_MODES:
            problems.append(f"console.mode={mode!r}: vmmpy has no virtio console; only Off or Null")
        leftovers("console", console, {"mode"}, _PCI_COMMON_DEFAULTS)

    # debug_console -----------------------------------------------------------------------
    debug_console = section("debug_console")
    if debug_console:
        if debug_console.get("mode") == "Off" and debug_console.get("file") is None:
            leftovers("debug_console", debug_console, {"mode", "file", "iobase"}, {})
        else:
            unsupported.append("debug_console")

    # rng ---------------------------------------------------------------------------------
    rng = body.get("rng")
    if rng is not None:
        ok = (
            isinstance(rng, dict)
            and rng.get("src") == _RNG_DEFAULT_SRC
            and all(
                key == "src"
                or value is None
                or (key in _PCI_COMMON_DEFAULTS and _same(value, _PCI_COMMON_DEFAULTS[key]))
                for key, value in rng.items()
            )
        )
        if not ok:
            unsupported.append("rng")

    # disks -------------------------------------------------------------------------------
    disks: list[DiskConfig] = []
    disks_body = body.get("disks")
    if disks_body is not None and not isinstance(disks_body, list):
        problems.append(f"disks={disks_body!r}: must be a list")
    for i, d in enumerate(disks_body if isinstance(disks_body, list) else []):
        label = f"disks[{i}]"
        if not isinstance(d, dict):
            problems.append(f"{label}={d!r}: must be an object")
            continue
        path = path_value(f"{label}.path", d.get("path"))
        if path is None:
            problems.append(f"{label}.path: required")
            continue
        flags = {}
        for name in ("readonly", "direct"):
            value = d.get(name)
            if value is not None and not isinstance(value, bool):
                problems.append(f"{label}.{name}={value!r}: must be a boolean")
            flags[name] = bool(value)
        disk_id = d.get("id")
        if disk_id is not None and not isinstance(disk_id, str):
            problems.append(f"{label}.id={disk_id!r}: must be a string")
            disk_id = None
        disks.append(DiskConfig(path=path, readonly=flags["readonly"], direct=flags["direct"], id=disk_id))
        leftovers(label, d, {"path", "readonly", "direct", "id"}, _DISK_DEFAULTS)

    # net ---------------------------------------------------------------------------------
    nets: list[NetConfig] = []
    net_body = body.get("net")
    if net_body is not None and not isinstance(net_body, list):
        problems.append(f"net={net_body!r}: must be a list")
    for i, n in enumerate(net_body if isinstance(net_body, list) else []):
        label = f"net[{i}]"
        if not isinstance(n, dict):
            problems.append(f"{label}={n!r}: must be an object")
            continue
        strings = {}
        for name in ("tap", "mac", "ip", "mask", "id"):
            value = n.get(name)
            if value is not None and not isinstance(value, str):
                problems.append(f"{label}.{name}={value!r}: must be a string")
                value = None
            strings[name] = value
        if strings["tap"] is None:
            problems.append(f"{label}.tap: required (a tap descriptor cannot travel in an HTTP body)")
            continue
        for name in _NET_OFFLOADS:
            if n.get(name) is not None and not isinstance(n.get(name), bool):
                problems.append(f"{label}.{name}={n.get(name)!r}: must be a boolean")
        nets.append(NetConfig(**strings))
        leftovers(label, n, {"tap", "mac", "ip", "mask", "id", *_NET_OFFLOADS}, _NET_DEFAULTS)

    # vsock -------------------------------------------------------------------------------
    vsock = None
    vsock_body = section("vsock")
    if vsock_body:
        cid, vsock_id = vsock_body.get("cid"), vsock_body.get("id")
        socket_path = path_value("vsock.socket", vsock_body.get("socket"))
        if cid is None or socket_path is None:
            problems.append("vsock: needs cid and socket")
        elif vsock_id is not None and not isinstance(vsock_id, str):
            problems.append(f"vsock.id={vsock_id!r}: must be a string")
        else:
            vsock = VsockConfig(cid=cid, socket=socket_path, id=vsock_id or VSOCK_DEFAULT_ID)
        leftovers("vsock", vsock_body, {"cid", "socket", "id"}, _PCI_COMMON_DEFAULTS)

    # everything else ---------------------------------------------------------------------
    known = {"payload", "cpus", "memory", "serial", "console", "debug_console", "rng", "disks", "net", "vsock"}
    for key, value in body.items():
        if key in known or _unset(value):
            continue
        if key in _TOP_DEFAULTS and _same(value, _TOP_DEFAULTS[key]):
            continue
        unsupported.append(key)

    message: list[str] = []
    if unsupported:
        message.append("unsupported VmConfig fields: " + ", ".join(sorted(set(unsupported))))
    message.extend(problems)
    disks = [d.replace(id=f"disk{i}") if d.id is None else d for i, d in enumerate(disks)]
    nets = [n.replace(id=f"net{i}") if n.id is None else n for i, n in enumerate(nets)]
    fields = dict(
        memory_mib=memory_mib,
        vcpus=boot,
        kernel=kernel,
        initramfs=initramfs,
        cmdline=cmdline,
        memory_shared=shared,
        serial=serial,
        boot_protocol=boot_protocol,
        disks=disks,
        net=nets,
        vsock=vsock,
    )
    if not message:
        message.extend(_check_vm_fields(**fields, api=True))
    if message:
        raise InvalidConfig("; ".join(message))
    return VmConfig(**fields)


#: What a migration peer's Config or a snapshot's config.json may set (docs/security.md): the
#: guest's shape (cpus, memory, payload.cmdline, and the console modes Off/Null). Its ``serial`` is
#: ignored (the destination's own command line or call chooses the backend) and its
#: ``payload.kernel``/``payload.initramfs`` paths are never opened: the content travels with it.
PEER_IGNORED = ("serial",)


def _peer_device_id(device: dict, label: str, default: str) -> str:
    """A peer device's id, looked up in this host's backings: a string (anything else, such as an
    unhashable list, is refused by name before any lookup), or `default` when absent."""
    device_id = device.get("id")
    if device_id is None:
        return default
    if not isinstance(device_id, str):
        raise InvalidConfig(f"{label}.id={_short(device_id)}: must be a string")
    return device_id


def _own_devices(
    body: dict, key: str, kind: str, backings: dict[str, str] | None, what: str, field: str, peer_only: tuple
) -> dict:
    """`body[key]` (a peer's device list) with each device's `field` from this host's `backings`
    (device id -> resource) and the peer's `peer_only` fields dropped; an id without one is
    refused. The peer's resources are never used."""
    devices = body.get(key)
    if not isinstance(devices, list):
        return body  # absent, or refused by name when the config is read
    backings = backings or {}
    own = []
    for i, d in enumerate(devices):
        if not isinstance(d, dict):
            raise InvalidConfig(f"{key}[{i}]={d!r}: must be an object")
        device_id = _peer_device_id(d, f"{key}[{i}]", f"{kind}{i}")
        if device_id not in backings:
            raise InvalidConfig(
                f"{kind} {device_id!r}: this host names no {what} for it "
                f"(give the destination's own {field} for each {kind} id); vmmpy never opens a {field} the peer names"
            )
        kept = {k: v for k, v in d.items() if k not in peer_only}
        own.append({**kept, "id": device_id, field: backings[device_id]})
    return {**body, key: own}


def from_peer(
    body: Any,
    content: dict,
    disk_backings: dict[str, str] | None = None,
    net_backings: dict[str, str] | None = None,
    vsock_socket: str | None = None,
    private_memory: bool = True,
) -> VmConfig:
    """A VmConfig from a migration peer or a snapshot, host paths taken out. `content` names the
    payload parts that travel as content; a part named only by a path is refused, with a message
    that does not depend on the path (nor on whether it exists here). Each disk's path is the one
    this host's operator gave for its id in `disk_backings`; a disk id without one is refused. So
    is each NIC's tap, from `net_backings` (net id -> tap name); the peer's tap, address and
    netmask are dropped, its MAC kept (the guest's identity on the network). The vsock device
    listens on `vsock_socket`, this host's own (its CID is the guest's); without one it is
    refused. Without `private_memory` the RAM is shared whatever memory.shared says: a peer or
    snapshot from before private RAM wrote false for memfd RAM, and a same-host migration maps
    the peer's memfds."""
    if not isinstance(body, dict):
        raise InvalidConfig(f"VmConfig body must be a JSON object, not {type(body).__name__}")
    body = {k: v for k, v in body.items() if k not in PEER_IGNORED}
    if not private_memory and isinstance(body.get("memory"), dict):
        body["memory"] = {**body["memory"], "shared": True}
    body = _own_devices(body, "disks", "disk", disk_backings, "backing file", "path", ("path",))
    body = _own_devices(body, "net", "net", net_backings, "tap", "tap", ("tap", "ip", "mask"))
    vsock = body.get("vsock")
    if isinstance(vsock, dict):
        if vsock_socket is None:
            raise InvalidConfig(
                "vsock: this host names no socket for it (give the destination's own vsock socket "
                "path); vmmpy never opens a path the peer names"
            )
        body["vsock"] = {**vsock, "socket": vsock_socket}
    payload = body.get("payload")
    if isinstance(payload, dict):
        payload = dict(payload)
        for name in ("kernel", "initramfs"):
            if payload.pop(name, None) is not None and name not in content:
                raise InvalidConfig(
                    f"payload.{name}: a peer or snapshot must carry it as content (size and "
                    "sha256); vmmpy never opens a host path it names"
                )
        body["payload"] = payload
    return _parse_api_vm_config(body)


# --------------------------------------------------------------------------------------------
# Cloud Hypervisor's other request bodies
# --------------------------------------------------------------------------------------------


class RequestBody(Record):
    """How vmmpy reads one of Cloud Hypervisor's request bodies.

    ``fields``: what vmmpy implements, name -> the JSON type it takes, or a tuple of enum values
    (any capitalisation; passed on in lower case); these become keyword arguments of the Vmm
    method. ``no_ops``: fields vmmpy takes with any value of the given type because it always does
    what they ask (restore's ``prefault``: memory is read in whole). ``ch_defaults``: fields vmmpy
    does not implement, accepted when they carry CH's default, because ch-remote serialises its
    whole struct, defaults included; any other value asks for something vmmpy does not do and is
    refused by name.
    """

    FIELDS = ("fields", "required", "ch_defaults", "no_ops")

    def __init__(
        self,
        fields: dict[str, Any],
        required: tuple[str, ...],
        ch_defaults: dict[str, Any] | None = None,
        no_ops: dict[str, Any] | None = None,
    ):
        self.fields, self.required = fields, required
        self.ch_defaults = {} if ch_defaults is None else ch_defaults
        self.no_ops = {} if no_ops is None else no_ops


# CH's defaults, as ch-remote sends them (api_client / vmm/src/api/mod.rs at CH 54):
# send-migration: preserve_source=false (the source VM is torn down: what vmmpy does),
#   memory_mode="Precopy";
# receive-migration: memory_mode="Precopy", vfio_fds/iommufd_fd=null (no passthrough
#   devices), zone_updates=[];
# restore: memory_restore_mode="Copy" (memory read from the files), net_fds/vfio_fds/iommufd_fd=null,
#   zone_updates=[].
#: A size field: bytes as an integer, or a string with a K/M/G suffix (checked by its consumer).
SIZE = "size"

REQUEST_BODIES: dict[str, RequestBody] = {
    "SendMigrationData": RequestBody(
        fields={
            "destination_url": str,
            "local": bool,
            "downtime_ms": int,
            "timeout_s": int,
            "timeout_strategy": ("cancel", "ignore"),
            "auto_converge": bool,
            "tls_dir": str,
            "connections": int,
            "max_bandwidth": SIZE,
        },
        required=("destination_url",),
        ch_defaults={"preserve_source": False, "memory_mode": "Precopy"},
    ),
    "ReceiveMigrationData": RequestBody(
        fields={"receiver_url": str, "tls_dir": str, "disks": dict, "net": dict, "vsock_socket": str},
        required=("receiver_url",),
        ch_defaults={"memory_mode": "Precopy", "vfio_fds": None, "iommufd_fd": None, "zone_updates": []},
    ),
    "VmSnapshotConfig": RequestBody(fields={"destination_url": str}, required=("destination_url",)),
    "RestoreConfig": RequestBody(
        fields={"source_url": str, "resume": bool, "disks": dict, "net": dict, "vsock_socket": str},
        required=("source_url",),
        ch_defaults={
            "memory_restore_mode": "Copy",
            "net_fds": None,
            "vfio_fds": None,
            "iommufd_fd": None,
            "zone_updates": [],
        },
        no_ops={"prefault": bool},
    ),
}

_JSON_TYPE_NAMES = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    SIZE: "an integer or a size string",
    dict: "an object",
}


def _json_type_ok(value: Any, kind: Any) -> bool:
    if kind is int:
        return _is_int(value)
    if kind is SIZE:
        return _is_int(value) or isinstance(value, str)
    return isinstance(value, kind)


def read_request_body(name: str, body: Any) -> dict[str, Any]:
    """The fields vmmpy implements from CH request body ``name`` (a key of
    :data:`REQUEST_BODIES`), as keyword arguments; :class:`InvalidConfig` naming every field that
    is unknown, of the wrong JSON type, or asks for what vmmpy does not do."""
    spec = REQUEST_BODIES[name]
    if not isinstance(body, dict):
        raise InvalidConfig(f"{name} must be a JSON object, not {_json_kind(body)}")
    out: dict[str, Any] = {}
    unsupported: list[str] = []
    problems: list[str] = []
    for key, value in body.items():
        if key in spec.fields and value is None and key not in spec.required:
            continue  # JSON null: not set (CH's reading of null for optional fields)
        if key in spec.fields:
            kind = spec.fields[key]
            if isinstance(kind, tuple):
                if isinstance(value, str) and value.lower() in kind:
                    out[key] = value.lower()
                else:
                    problems.append(f"{key}={_short(value)}: expected one of {', '.join(v.capitalize() for v in kind)}")
            elif _json_type_ok(value, kind):
                out[key] = value
            else:
                problems.append(f"{key}={_short(value)}: must be {_JSON_TYPE_NAMES[kind]}")
        elif key in spec.no_ops:
            if not _json_type_ok(value, spec.no_ops[key]):
                problems.append(f"{key}={_short(value)}: must be {_JSON_TYPE_NAMES[spec.no_ops[key]]}")
        elif key in spec.ch_defaults and _same(value, spec.ch_defaults[key]):
            continue
        else:
            unsupported.append(key)
    missing = [key for key in spec.required if key not in body]
    message: list[str] = []
    if unsupported:
        message.append(
            f"unsupported {name} fields: {', '.join(sorted(unsupported))} "
            "(vmmpy accepts them only at Cloud Hypervisor's default value)"
        )
    if missing:
        message.append(f"{name} needs {', '.join(missing)}")
    message.extend(problems)
    if message:
        raise InvalidConfig("; ".join(message))
    return out


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    """A value for an error message: JSON, cut short (a client's value can be large)."""
    import json  # error messages only: json imports re, kept off the boot path

    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def request_body_from_options(name: str, text: str, flag: str, bare: str) -> dict[str, Any]:
    """CH request body `name` (a key of :data:`REQUEST_BODIES`) from a command-line option string
    (``vmmpy --restore``, ``vmmpy-remote send-migration ...``), as ch-remote builds it: each field
    becomes the JSON type the body takes (booleans by :func:`vmmpy.options.parse_bool`). A key the
    body does not name stays a string, for :func:`read_request_body` to refuse by name."""
    spec = REQUEST_BODIES[name]
    kinds: dict[str, Any] = {**spec.fields, **spec.no_ops}
    kinds.update({k: type(v) for k, v in spec.ch_defaults.items() if isinstance(v, bool)})
    body: dict[str, Any] = {}
    for key, value in parse_options(text, flag, None, f"{bare}=...[,key=value...]", bare=bare).items():
        kind = kinds.get(key)
        if kind is bool:
            body[key] = parse_bool(value, f"{flag} {key}")
        elif kind is int:
            body[key] = parse_int(value, f"{flag} {key}")
        elif kind is SIZE and value.isascii() and value.strip().isdigit():
            body[key] = int(value)
        else:
            body[key] = value
    return body


# --------------------------------------------------------------------------------------------
# Command-line flags (Cloud Hypervisor syntax)
# --------------------------------------------------------------------------------------------


def parse_disk(text: str) -> DiskConfig:
    """``--disk path=FILE[,readonly=on][,id=NAME][,direct=on]`` → a DiskConfig (not yet checked)."""
    usage = "path=<file>[,readonly=on|off][,id=<name>][,direct=on|off]"
    opts = parse_options(text, "--disk", ("path", "readonly", "id", "direct"), usage)
    if "path" not in opts:
        raise InvalidConfig(f"--disk {text!r}: expected {usage}")
    return DiskConfig(
        path=opts["path"],
        readonly=parse_bool(opts["readonly"], "--disk readonly") if "readonly" in opts else False,
        id=opts.get("id"),
        direct=parse_bool(opts["direct"], "--disk direct") if "direct" in opts else False,
    )


def parse_net(text: str) -> NetConfig:
    """``--net tap=NAME[,mac=..][,ip=..,mask=..][,id=..]`` or ``fd=N`` (an inherited tap
    descriptor) -> a NetConfig (not yet checked)."""
    usage = "tap=<name>|fd=<n>[,mac=<xx:xx:xx:xx:xx:xx>][,ip=<ipv4>,mask=<ipv4>][,id=<name>]"
    opts = parse_options(text, "--net", ("tap", "fd", "mac", "ip", "mask", "id"), usage)
    fd = None
    if "fd" in opts:
        raw = opts["fd"].strip().removeprefix("[").removesuffix("]")
        if not raw.isdigit():
            raise InvalidConfig(f"--net fd={opts['fd']!r}: one descriptor number (vmmpy uses one queue pair)")
        fd = int(raw)
    return NetConfig(
        tap=opts.get("tap"), fd=fd, mac=opts.get("mac"), ip=opts.get("ip"), mask=opts.get("mask"), id=opts.get("id")
    )


# What a destination's --net cannot take, and why: the rest of a NIC comes with the VM.
_NET_BACKING_REFUSED = {
    "mac": "the MAC comes with the VM (the guest's identity on the network)",
    "ip": "a destination does not set its tap's address (give the tap its address beforehand)",
    "mask": "a destination does not set its tap's address (give the tap its address beforehand)",
    "fd": "a destination's tap is named (tap=NAME)",
}


def parse_net_backing(text: str) -> tuple[str | None, str]:
    """``--net tap=NAME[,id=ID]`` on a VMM that restores or receives its VM: (net id or None,
    this host's tap for it). Any other option is refused by name, not ignored."""
    usage = "tap=<name>[,id=<name>] (a restored or received VM keeps its own MAC)"
    opts = parse_options(text, "--net", None, usage)
    for key in opts:
        if key in _NET_BACKING_REFUSED:
            raise InvalidConfig(
                f"--net {key}={opts[key]}: not for a VM this VMM restores or receives: {_NET_BACKING_REFUSED[key]}"
            )
        if key not in ("tap", "id"):
            raise InvalidConfig(f"--net {text!r}: unsupported option {key!r}; expected {usage}")
    if "tap" not in opts:
        raise InvalidConfig(f"--net {text!r}: a destination's tap is named; expected {usage}")
    return opts.get("id"), opts["tap"]


def parse_vsock(text: str) -> VsockConfig:
    """``--vsock cid=N,socket=PATH[,id=NAME]`` → a VsockConfig (not yet checked)."""
    usage = "cid=<3..>,socket=<path>[,id=<name>]"
    opts = parse_options(text, "--vsock", ("cid", "socket", "id"), usage)
    if "cid" not in opts or "socket" not in opts:
        raise InvalidConfig(f"--vsock {text!r}: expected {usage}")
    return VsockConfig(cid=parse_int(opts["cid"], "--vsock cid"), socket=opts["socket"], id=opts.get("id"))


def parse_vsock_socket(text: str) -> str:
    """``--vsock socket=PATH`` on a VMM that restores or receives its VM: this host's socket for
    the VM's vsock device (whose CID is the VM's own)."""
    usage = "socket=<path> (a restored or received VM keeps its own CID)"
    opts = parse_options(text, "--vsock", ("socket",), usage)
    if "socket" not in opts:
        raise InvalidConfig(f"--vsock {text!r}: expected {usage}")
    return opts["socket"]


def parse_memory(text: str) -> dict:
    """``--memory size=512M,shared=on`` → ``{"memory_mib": 512, "memory_shared": True}``."""
    usage = "size=<bytes>[K|M|G][,shared=on|off]"
    opts = parse_options(text, "--memory", ("size", "shared"), usage)
    out: dict[str, Any] = {}
    if "size" in opts:
        size = parse_size(opts["size"], "--memory size")
        if size % MIB:
            raise InvalidConfig(f"--memory size={opts['size']!r}: must be a multiple of 1 MiB")
        mib = size // MIB
        if mib < MIN_MEMORY_MIB:
            raise InvalidConfig(f"--memory size={opts['size']!r}: must be at least {MIN_MEMORY_MIB} MiB")
        bound = host_memory_mib()
        if mib > bound:
            raise InvalidConfig(f"--memory size={opts['size']!r}: more than this host's memory ({_format_mib(bound)})")
        out["memory_mib"] = mib
    if "shared" in opts:
        out["memory_shared"] = parse_bool(opts["shared"], "--memory shared")
    return out


def parse_cpus(text: str) -> dict:
    """``--cpus boot=2[,max=2]`` → ``{"vcpus": 2}`` (``max`` must equal ``boot``)."""
    usage = f"boot=<1..{MAX_VCPUS}>[,max=<same>]"
    opts = parse_options(text, "--cpus", ("boot", "max"), usage)

    def number(key: str) -> int:
        raw = opts[key].strip()
        if not raw.isdigit() or not MIN_VCPUS <= int(raw) <= MAX_VCPUS:
            raise InvalidConfig(f"--cpus {key}={opts[key]!r}: must be an integer from {MIN_VCPUS} to {MAX_VCPUS}")
        return int(raw)

    out: dict[str, Any] = {}
    boot = number("boot") if "boot" in opts else None
    max_vcpus = number("max") if "max" in opts else None
    if boot is None:
        boot = max_vcpus if max_vcpus is not None else 1
    if max_vcpus is not None and max_vcpus != boot:
        raise InvalidConfig(f"--cpus max={opts['max']!r}: vCPU hotplug is not supported, must equal boot ({boot})")
    out["vcpus"] = boot
    return out


def parse_serial(text: str) -> SerialConfig:
    """``--serial off|null|tty|file=<path>|socket=<path>`` → :class:`SerialConfig`."""
    usage = "off|null|tty|file=<path>|socket=<path>"
    items = split_options(text, "--serial")
    if len(items) != 1:
        raise InvalidConfig(f"--serial {text!r}: expected {usage}")
    key, value = items[0]
    if value is None:
        keyword = key.lower()
        if keyword in ("off", "null", "tty"):
            return SerialConfig(mode=keyword.capitalize())
        if keyword == "pty":
            raise InvalidConfig(f"--serial {text!r}: pty is not supported by vmmpy; expected {usage}")
        raise InvalidConfig(f"--serial {text!r}: expected {usage}")
    if key == "file" and value:
        return SerialConfig(mode="File", file=value)
    if key == "socket" and value:
        return SerialConfig(mode="Socket", socket=value)
    raise InvalidConfig(f"--serial {text!r}: expected {usage}")


def parse_console(text: str) -> str:
    """``--console off|null`` → ``"Off"``/``"Null"``; vmmpy has no virtio console."""
    value = text.strip().lower() if isinstance(text, str) else ""
    if value in ("off", "null"):
        return value.capitalize()
    raise InvalidConfig(f"--console {text!r}: vmmpy has no virtio console; expected off or null")
