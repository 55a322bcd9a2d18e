"""Booting real Linux: Debian's own kernels (fetched by tests/linux_kernel.py), as bzImage and as the
ELF vmlinux that vmmpy.kernel extracts from it.

On the PVM hosts vmmpy is developed on, guest supervisor code is instruction-emulated
(docs/host.md), so Linux gets through early boot only. What is checked here:

* bzImage: vmmpy's 64-bit entry reaches the kernel's decompressor, which prints its first line on
  the serial console and writes the very vmlinux that vmmpy.kernel extracts to 0x1000000. (Debian
  builds without CONFIG_X86_VERBOSE_BOOTUP, so its decompressor never prints
  ``Decompressing Linux...``; with ``nokaslr`` it prints ``KASLR disabled: 'nokaslr' on cmdline.``
  from extract_kernel() just before it decompresses.) Decompressing takes minutes here: not waited.
* vmlinux, through the 64-bit entry and through PVH (the default for an ELF with the PVH note): the
  banner, the exact command line, every e820 line against the map vmmpy wrote into the zero page
  or hvm_start_info (and against layout.rs's rules), the ACPI table lines with vmmpy's OEM id.
* the emulation failure that eventually ends the kernel here is a VM error (event ``vm.error``,
  state ``Error``), and the VMM survives it.
* bad kernels, initramfs and command lines: PayloadError before any vCPU runs (API 400, CLI exit 1).
* on hardware KVM only: a full boot into a busybox initramfs, ``reboot -f`` and ``poweroff -f``;
  the ACPI power button; a virtio disk written, synced and read back across a reboot; a virtio NIC
  that answers the host's ping.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import linux_kernel
from conftest import SerialClient
from net_helpers import GUEST_IP, GUEST_MAC, ping_answered
from vmmpy import Vmm
from vmmpy import kernel as vmmpy_kernel
from vmmpy.client import error_message
from vmmpy.config import SerialConfig, VmConfig
from vmmpy.errors import PayloadError

MIB = 1 << 20
ZERO_PAGE = 0x7000
PVH_START_INFO = 0x6000
PVH_MAGIC = 0x336EC578
LOAD_PHYSICAL_ADDR = 0x1000000  # Debian's CONFIG_PHYSICAL_START: where the decompressor writes
MMIO_HOLE_START = 0xC000_0000
FOUR_GIB = 1 << 32
E820_NAMES = {1: "usable", 2: "reserved", 3: "ACPI data", 4: "ACPI NVS", 5: "unusable"}
ACPI_TABLES = ("RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG")
PCI_ECAM = (0xE000_0000, 0x10_0000)  # docs/devices.md: reserved in the e820 map
DECOMPRESSOR_LINE = rb"KASLR disabled: 'nokaslr' on cmdline\."


# ------------------------------------------------------------------------------------------------
# Fixtures: one download per kernel package per cache; the extraction is cached with it.


@pytest.fixture(scope="session")
def cloud_kernel() -> linux_kernel.DebianKernel:
    return linux_kernel.fetch_kernel("cloud")


@pytest.fixture(scope="session")
def generic_kernel() -> linux_kernel.DebianKernel:
    return linux_kernel.fetch_kernel("generic")


@pytest.fixture(params=["cloud", "generic"])
def debian_kernel(request) -> linux_kernel.DebianKernel:
    return request.getfixturevalue(f"{request.param}_kernel")


class LinuxVm:
    """An in-process Vmm booting `kernel`, its serial console on a socket, with timing marks."""

    def __init__(
        self,
        tmp: Path,
        kernel: str,
        cmdline: str,
        memory_mib: int = 256,
        vcpus: int = 2,
        initramfs: str | None = None,
        boot_protocol: str | None = None,
    ):
        self.serial_path = str(tmp / f"linux-{time.monotonic_ns()}.serial")
        self.vmm = Vmm(serial=SerialConfig(mode="Socket", socket=self.serial_path))
        self.serial = SerialClient(self.serial_path)
        self.config = VmConfig(
            memory_mib=memory_mib,
            vcpus=vcpus,
            kernel=kernel,
            cmdline=cmdline,
            initramfs=initramfs,
            boot_protocol=boot_protocol,
        )
        self.vmm.create(self.config)
        self.t0 = time.monotonic()
        self.vmm.boot()
        self.marks: dict[str, float] = {}

    def expect(self, label: str, pattern: bytes | str, timeout: float) -> re.Match:
        left = timeout - (time.monotonic() - self.t0)
        m = self.serial.expect(pattern, max(left, 0.1))
        self.marks[label] = round(time.monotonic() - self.t0, 2)
        return m

    def guest_bytes(self, addr: int, size: int) -> bytes:
        (low, *_) = self.vmm.memory_regions()
        view = memoryview(low)
        try:
            return bytes(view[addr : addr + size])
        finally:
            view.release()

    def report(self, what: str) -> None:
        marks = ", ".join(f"{k} {v:.2f}s" for k, v in self.marks.items())
        print(f"\n{what}: {marks}")

    def close(self) -> None:
        self.serial.close()
        self.vmm.close()


def zero_page_e820(vm: LinuxVm) -> list[tuple[int, int, int]]:
    """The e820 table vmmpy wrote into boot_params (count at 0x1e8, table at 0x2d0)."""
    zp = vm.guest_bytes(ZERO_PAGE, 4096)
    return [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(zp[0x1E8])]


def start_info(vm: LinuxVm) -> tuple[list[tuple[int, int, int]], int, int]:
    """The memory map (hvm_memmap_table_entry: addr, size, type), RSDP and command line addresses
    in the hvm_start_info vmmpy wrote for a PVH entry."""
    magic, version, _, _, _, cmdline, rsdp, memmap, entries = struct.unpack(
        "<IIIIQQQQI", vm.guest_bytes(PVH_START_INFO, 52)
    )
    assert (magic, version) == (PVH_MAGIC, 1)
    table = vm.guest_bytes(memmap, 24 * entries)
    return [struct.unpack_from("<QQI", table, 24 * i) for i in range(entries)], rsdp, cmdline


def layout_e820(ram: int) -> list[tuple[int, int, int]]:
    """rust/layout.rs e820_map(), restated: RAM below the EBDA, EBDA and BIOS area reserved, RAM
    from 1 MiB to the MMIO hole at 3 GiB, the PCI ECAM reserved, the rest of RAM from 4 GiB."""
    out = [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xE0000, 0x20000, 2)]
    ecam = (*PCI_ECAM, 2)
    if ram <= MMIO_HOLE_START:
        return out + [(0x100000, ram - 0x100000, 1), ecam]
    return out + [(0x100000, MMIO_HOLE_START - 0x100000, 1), ecam, (FOUR_GIB, ram - MMIO_HOLE_START, 1)]


def pvh_e820_as_linux_prints(entries: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """What Linux makes of a PVH memory map before it prints it: its PVH entry adds the ISA hole
    [0xa0000, 0x100000) as reserved (arch/x86/platform/pvh/enlighten.c), and sanitising the table
    merges ranges of one type that touch or overlap."""
    out: list[list[int]] = []
    for addr, size, kind in sorted(entries + [(0xA0000, 0x60000, 2)]):
        if out and out[-1][2] == kind and addr <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], addr + size - out[-1][0])
        else:
            out.append([addr, size, kind])
    return [tuple(e) for e in out]


def e820_line(addr: int, size: int, kind: int) -> bytes:
    return f"BIOS-e820: [mem {addr:#018x}-{addr + size - 1:#018x}] {E820_NAMES[kind]}".encode()


# ------------------------------------------------------------------------------------------------
# vmmpy.kernel: what the files are, and the vmlinux inside the bzImage.


@pytest.mark.parametrize("flavour,compression", [("cloud", "lz4"), ("generic", "xz")])
def test_extract_vmlinux_from_debian_bzimage(request, flavour, compression):
    k: linux_kernel.DebianKernel = request.getfixturevalue(f"{flavour}_kernel")
    assert k.config_value(f"CONFIG_KERNEL_{compression.upper()}") == "y"
    bz = vmmpy_kernel.inspect(k.bzimage)
    assert bz.kind == "bzimage" and bz.entry64 and bz.compression == compression
    assert tuple(int(x) for x in bz.protocol.split(".")) >= (2, 12)
    assert bz.version.split()[0] == k.release
    data = k.bzimage.read_bytes()
    vmlinux = vmmpy_kernel.extract_vmlinux(data, str(k.bzimage))
    assert vmlinux == k.vmlinux.read_bytes()
    elf = vmmpy_kernel.inspect_bytes(vmlinux)
    assert elf.kind == "elf" and elf.entry == LOAD_PHYSICAL_ADDR and elf.version == k.release
    assert elf.pvh_entry is not None  # Debian builds CONFIG_PVH: vmmpy enters there by default
    with pytest.raises(PayloadError, match="already an ELF"):
        vmmpy_kernel.extract_vmlinux(vmlinux)
    with pytest.raises(PayloadError, match="truncated"):
        vmmpy_kernel.extract_vmlinux(data[: len(data) // 2])


def test_kernel_module_command_line(cloud_kernel, tmp_path):
    out = tmp_path / "vmlinux"
    p = subprocess.run(
        [sys.executable, "-m", "vmmpy.kernel", "extract", str(cloud_kernel.bzimage), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "ELF vmlinux" in p.stdout and out.read_bytes() == cloud_kernel.vmlinux.read_bytes()
    p = subprocess.run(
        [sys.executable, "-m", "vmmpy.kernel", "info", str(cloud_kernel.bzimage)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0 and "bzImage (boot protocol 2." in p.stdout and "lz4 payload" in p.stdout
    p = subprocess.run(
        [sys.executable, "-m", "vmmpy.kernel", "extract", str(out), str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "already an ELF" in p.stderr


# ------------------------------------------------------------------------------------------------
# bzImage: the 64-bit entry reaches the decompressor.


def test_bzimage_reaches_the_decompressor(debian_kernel, tmp_path):
    vm = LinuxVm(tmp_path, str(debian_kernel.bzimage), "console=ttyS0 earlyprintk=serial nokaslr")
    try:
        assert vm.vmm.info()["payload_kind"] == "bzimage"
        vm.expect("decompressor line", DECOMPRESSOR_LINE, 120)
        # The decompressor writes the ELF vmlinux at LOAD_PHYSICAL_ADDR (nokaslr): its first page
        # must be the one vmmpy.kernel extracted. Only the start is waited for; all of it takes
        # minutes under emulation.
        want = debian_kernel.vmlinux.read_bytes()[:4096]
        deadline = vm.t0 + 300
        while vm.guest_bytes(LOAD_PHYSICAL_ADDR, len(want)) != want:
            assert time.monotonic() < deadline, "the decompressor wrote no vmlinux at 0x1000000"
            assert vm.vmm.info()["state"] == "Running", vm.vmm.info()
            time.sleep(0.1)
        vm.marks["vmlinux ELF header at 0x1000000"] = round(time.monotonic() - vm.t0, 2)
        vm.report(f"bzImage {debian_kernel.release}")
    finally:
        vm.close()


# ------------------------------------------------------------------------------------------------
# vmlinux: early boot, read from the serial console.

# Each line must come within this many seconds of entry. The kernel's supervisor code is emulated
# here, so on a busy host early boot takes several times its idle ~10-40 s; the lines come in a fixed
# order and the emulation failure that ends the boot comes after all of them.
EARLY_BOOT_S = 300
CLOUD_MIB = 256
GENERIC_MIB = 4096  # above the MMIO hole: the e820 gets RAM from 4 GiB on


def _early_boot(
    tmp: Path, kernel: linux_kernel.DebianKernel, memory_mib: int, vcpus: int, boot_protocol: str = "linux64"
):
    cmdline = f"console=ttyS0 earlyprintk=serial nokaslr vmmpy.test=early-boot-{kernel.flavour}"
    vm = LinuxVm(tmp, str(kernel.vmlinux), cmdline, memory_mib=memory_mib, vcpus=vcpus, boot_protocol=boot_protocol)
    vm.cmdline = cmdline
    vm.kernel = kernel
    return vm


@pytest.fixture(scope="module")
def cloud_early_boot(cloud_kernel, tmp_path_factory):
    vm = _early_boot(tmp_path_factory.mktemp("cloud"), cloud_kernel, CLOUD_MIB, vcpus=2)
    yield vm
    vm.close()


@pytest.fixture(scope="module")
def cloud_pvh_early_boot(cloud_kernel, tmp_path_factory):
    """The same kernel entered through its PVH note (vmmpy's default for it): booted once."""
    vm = _early_boot(tmp_path_factory.mktemp("cloud-pvh"), cloud_kernel, CLOUD_MIB, vcpus=2, boot_protocol="pvh")
    yield vm
    vm.close()


def check_early_boot(vm: LinuxVm, memory_mib: int, vcpus: int, smp_line: bool = True) -> None:
    info = vm.vmm.info()
    assert info["payload_kind"] == "elf"
    assert info["boot_protocol"] == vm.config.boot_protocol
    # APs wait for the kernel's INIT/SIPI.
    assert info["vcpu_states"][1:] == ["running"] * (vcpus - 1)
    if vm.config.boot_protocol == "pvh":
        built, rsdp, cmdline_addr = start_info(vm)
        assert vm.guest_bytes(cmdline_addr, len(vm.cmdline) + 1) == vm.cmdline.encode() + b"\0"
        printed = pvh_e820_as_linux_prints(built)
    else:
        built = zero_page_e820(vm)
        rsdp = int.from_bytes(vm.guest_bytes(ZERO_PAGE + 0x70, 8), "little")
        printed = built
    assert built == layout_e820(memory_mib * MIB)

    m = vm.expect("Linux version", rb"Linux version (\S+) ", EARLY_BOOT_S)
    assert m.group(1).decode() == vm.kernel.release
    m = vm.expect("Command line", rb"Command line: ([^\r\n]*)\r?\n", EARLY_BOOT_S)
    assert m.group(1).decode() == vm.cmdline
    vm.expect("e820 header", rb"BIOS-provided physical RAM map:\r?\n", EARLY_BOOT_S)
    lines = [vm.expect(f"e820 {i}", rb"(BIOS-e820: [^\r\n]*)\r?\n", EARLY_BOOT_S).group(1) for i in range(len(printed))]
    assert lines == [e820_line(*entry) for entry in printed]
    # The line after the map is not another e820 entry.
    nxt = vm.expect("after e820", rb"\] ([^\r\n]*)\r?\n", EARLY_BOOT_S).group(1)
    assert not nxt.startswith(b"BIOS-e820")

    seen = {}
    for sig in ACPI_TABLES:
        m = vm.expect(
            f"ACPI {sig}",
            rb"ACPI: " + sig.encode() + rb" 0x([0-9A-F]{16}) ([0-9A-F]{6}) \(v(\d\d) ([^)]*)\)",
            EARLY_BOOT_S,
        )
        seen[sig] = (int(m.group(1), 16), int(m.group(2), 16), int(m.group(3)), m.group(4).decode())
    assert seen["RSDP"][0] == rsdp
    assert seen["RSDP"][3].split() == ["VMMPY"]
    for sig in ACPI_TABLES[1:]:
        assert seen[sig][3].split()[:2] == ["VMMPY", "VMMPYVM"], seen[sig]
        header = vm.guest_bytes(seen[sig][0], 36)
        assert header[:4] == sig.encode() and int.from_bytes(header[4:8], "little") == seen[sig][1]
    if smp_line:  # printed after the memory map is set up: late with a lot of RAM
        m = vm.expect("smpboot: Allowing N CPUs", rb"smpboot: Allowing (\d+) CPUs", EARLY_BOOT_S)
        assert int(m.group(1)) == vcpus
    vm.report(f"vmlinux {vm.kernel.release} ({vm.config.boot_protocol}), {memory_mib} MiB, {vcpus} vCPUs")


def test_cloud_vmlinux_early_boot(cloud_early_boot):
    check_early_boot(cloud_early_boot, CLOUD_MIB, 2)


def test_cloud_vmlinux_early_boot_through_pvh(cloud_pvh_early_boot):
    """Entered at the PVH note in 32-bit mode, the kernel prints the same lines from hvm_start_info."""
    check_early_boot(cloud_pvh_early_boot, CLOUD_MIB, 2)


def test_cloud_vmlinux_emulation_failure_is_a_vm_error(cloud_early_boot):
    """Same boot as above, left running: the kernel eventually executes an instruction this host's
    emulator refuses (here `lock cmpxchg16b` in SLUB, ~40 s in; `int3` in other configurations).
    The VM goes to Error with the exit and registers; the VMM keeps serving."""
    vm = cloud_early_boot
    event = vm.vmm.wait_for_event("vm.error", timeout=max(1.0, 2 * EARLY_BOOT_S - (time.monotonic() - vm.t0)))
    vm.marks["vm.error"] = round(time.monotonic() - vm.t0, 2)
    info = vm.vmm.info()
    assert info["state"] == "Running" and info["vmmpy_state"] == "Error"  # CH's enum, vmmpy's detail
    assert "internal error" in info["error"]["reason"], info["error"]
    assert int(info["error"]["regs"]["rip"], 16) >= 0xFFFFFFFF80000000  # in the kernel proper
    assert event["properties"]["reason"] == info["error"]["reason"]
    assert vm.vmm.ping()["pid"] == os.getpid()
    vm.vmm.shutdown()
    assert vm.vmm.info()["state"] == "Created"
    vm.report("cloud vmlinux until the emulation failure")


def test_generic_vmlinux_early_boot_above_4g(generic_kernel, tmp_path):
    vm = _early_boot(tmp_path, generic_kernel, GENERIC_MIB, vcpus=3)
    try:
        check_early_boot(vm, GENERIC_MIB, 3, smp_line=False)
    finally:
        vm.close()


@pytest.mark.parametrize(
    "which,kind,args,protocol",
    [
        ("bzimage", "bzimage", (), "linux64"),
        ("vmlinux", "elf", (), "pvh"),
        ("vmlinux", "elf", ("--boot-protocol", "linux64"), "linux64"),
    ],
)
def test_cli_says_which_kernel_it_found(cloud_kernel, vmm_process, which, kind, args, protocol):
    path = str(getattr(cloud_kernel, which))
    p = vmm_process("--kernel", path, "--memory", "size=256M", "--cmdline", "console=ttyS0", *args)
    p.wait_event("vm.booted", timeout=30)
    status, info = p.api.info()
    assert status == 200 and info["payload_kind"] == kind and info["boot_protocol"] == protocol
    deadline = time.monotonic() + 10
    while f"payload_kind={kind}" not in p.log_path.read_text():
        assert time.monotonic() < deadline, p.log_path.read_text()
        time.sleep(0.05)
    line = next(x for x in p.log_path.read_text().splitlines() if "payload_kind=" in x)
    assert line.startswith(f"vmmpy: kernel {path}: payload_kind={kind} boot_protocol={protocol}: ")
    assert ("bzImage (boot protocol" if kind == "bzimage" else "ELF vmlinux") in line


# ------------------------------------------------------------------------------------------------
# Bad payloads: a clear PayloadError before any vCPU runs.


def _bad_cases(tmp: Path, cloud, generic) -> dict:
    junk = tmp / "junk"
    junk.write_bytes(os.urandom(1 << 20))
    empty = tmp / "empty"
    empty.write_bytes(b"")
    short_bz = tmp / "short-bzImage"
    short_bz.write_bytes(cloud.bzimage.read_bytes()[: 2 * MIB])
    short_elf = tmp / "short-vmlinux"
    short_elf.write_bytes(cloud.vmlinux.read_bytes()[: 8 * MIB])
    big_initrd = tmp / "initrd-100M"
    with open(big_initrd, "wb") as f:
        f.truncate(100 * MIB)
    return {
        "not a kernel": (dict(kernel=str(junk)), "not a kernel"),
        "empty file": (dict(kernel=str(empty)), "empty"),
        "truncated bzImage": (dict(kernel=str(short_bz)), "truncated"),
        "truncated vmlinux": (dict(kernel=str(short_elf)), "truncated"),
        "bzImage too big for RAM": (dict(kernel=str(generic.bzimage), memory_mib=64), "too big for RAM"),
        "vmlinux too big for RAM": (dict(kernel=str(generic.vmlinux), memory_mib=64), "too big for RAM"),
        "initramfs overlapping the kernel": (
            dict(kernel=str(cloud.vmlinux), memory_mib=128, initramfs=str(big_initrd)),
            "overlap the kernel",
        ),
        "command line too long": (
            dict(kernel=str(cloud.bzimage), cmdline="console=ttyS0 " + "x" * 2100),
            "at most 2047",
        ),
    }


BAD_CASES = [
    "not a kernel",
    "empty file",
    "truncated bzImage",
    "truncated vmlinux",
    "bzImage too big for RAM",
    "vmlinux too big for RAM",
    "initramfs overlapping the kernel",
    "command line too long",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_payload_is_a_clear_error_before_any_vcpu_runs(cloud_kernel, generic_kernel, tmp_path, case):
    kwargs, message = _bad_cases(tmp_path, cloud_kernel, generic_kernel)[case]
    with Vmm() as vmm:
        vmm.create(VmConfig(**{"memory_mib": 256, "vcpus": 1, **kwargs}))
        with pytest.raises(PayloadError, match=message) as exc:
            vmm.boot()
        assert "\n" not in str(exc.value)
        info = vmm.info()
        assert info["state"] == "Created" and "vcpu_states" not in info
        assert not vmm.events.events("vm.booted")


def test_bad_kernel_over_the_api_is_400_and_on_the_cli_one_line(cloud_kernel, vmm_process, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    p = vmm_process()
    status, _ = p.api.create({"payload": {"kernel": str(junk)}, "memory": {"size": 128 * MIB}})
    assert status == 204
    status, body = p.api.boot()
    assert status == 400 and "not a kernel" in error_message(body), body
    status, info = p.api.info()
    assert info["state"] == "Created"
    # Over the CLI: exit status 1 and one line on stderr.
    cli = subprocess.run(
        [sys.executable, "-m", "vmmpy.cli", "--kernel", str(cloud_kernel.bzimage), "--memory", "size=64M"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1
    assert cli.stderr.count("\n") == 1 and cli.stderr.startswith("vmmpy: error: kernel "), cli.stderr
    assert "too big for RAM" in cli.stderr


# ------------------------------------------------------------------------------------------------
# Full boot (hardware KVM only): busybox initramfs, reboot -f, poweroff -f.

INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
echo "VMMPY-LINUX-UP cpus=$(/bin/busybox grep -c ^processor /proc/cpuinfo)"
while read -r cmd; do
  case "$cmd" in
    reboot) echo VMMPY-REBOOTING; /bin/busybox reboot -f ;;
    poweroff) echo VMMPY-POWERING-OFF; /bin/busybox poweroff -f ;;
    ged) echo "VMMPY-GED $(/bin/busybox grep ACPI:Ged /proc/interrupts)" ;;
    *) echo "VMMPY-ECHO $cmd" ;;
  esac
done
"""


def _cpio_newc(entries: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A newc cpio archive: (name, mode, data, rdev major, rdev minor) per entry, then the trailer."""
    out = bytearray()
    for ino, (name, mode, data, major, minor) in enumerate(entries + [("TRAILER!!!", 0, b"", 0, 0)], 1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(raw), 0]
        out += b"070701" + "".join(f"{v:08x}" for v in fields).encode() + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def build_busybox_initramfs(busybox: Path, dest: Path) -> Path:
    d = stat.S_IFDIR | 0o755
    entries = [(n, d, b"", 0, 0) for n in ("bin", "dev", "proc", "sys")]
    entries += [
        ("dev/console", stat.S_IFCHR | 0o600, b"", 5, 1),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes(), 0, 0),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox", 0, 0),
        ("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode(), 0, 0),
    ]
    dest.write_bytes(_cpio_newc(entries))
    return dest


def hardware_kvm() -> str | None:
    for module in ("kvm_intel", "kvm_amd"):
        if os.path.exists(f"/sys/module/{module}"):
            return module
    return None


def require_hardware_kvm() -> None:
    if hardware_kvm() is None:
        modules = " ".join(m for m in os.listdir("/sys/module") if m.startswith("kvm")) or "none"
        reason = (
            "not applicable on this host: a full Linux boot needs hardware KVM "
            f"(/sys/module/kvm_intel or /sys/module/kvm_amd); this host's KVM modules: {modules}"
        )
        print(f"\n{__name__}: {reason}", file=sys.__stderr__, flush=True)
        pytest.skip(reason)


def boot_full_linux(vmm_process, kernel, initramfs: Path, *args: str, netns: str | None = None):
    """A `vmmpy` process booting Debian's kernel into `initramfs`, 512 MiB, serial console."""
    return vmm_process(
        "--kernel",
        str(kernel.bzimage),
        "--initramfs",
        str(initramfs),
        "--memory",
        "size=512M",
        "--cmdline",
        "console=ttyS0 rdinit=/init panic=-1",
        *args,
        netns=netns,
    )


def test_full_boot_busybox_reboot_and_poweroff(cloud_kernel, vmm_process, tmp_path):
    require_hardware_kvm()
    busybox = linux_kernel.fetch_busybox()
    initramfs = build_busybox_initramfs(busybox, tmp_path / "initramfs.cpio")
    p = boot_full_linux(vmm_process, cloud_kernel, initramfs, "--cpus", "boot=2")
    m = p.serial.expect(rb"VMMPY-LINUX-UP cpus=(\d+)", 120)
    assert int(m.group(1)) == 2
    p.serial.command("hello", rb"VMMPY-ECHO hello")
    p.serial.command("reboot", rb"VMMPY-REBOOTING")
    p.wait_event("vm.rebooted", timeout=60)
    p.serial.expect(rb"VMMPY-LINUX-UP cpus=2", 120)
    status, info = p.api.info()
    assert info["boot_count"] == 2
    p.serial.command("poweroff", rb"VMMPY-POWERING-OFF")
    p.wait_event("vm.shutdown", timeout=60)
    assert p.wait_exit(30) == 0


GED_INTERRUPTS = re.compile(rb"VMMPY-GED +5:((?: +\d+)+) +IO-APIC +5-edge +ACPI:Ged\r?\n")


def test_linux_takes_the_power_button_through_its_ged_driver(cloud_kernel, vmm_process, tmp_path):
    """Linux's evged driver claims GSI 5 from the GED's _CRS and runs _EVT on each press (the
    power-off itself needs the button driver, a module, and acpid: not in this initramfs)."""
    require_hardware_kvm()
    busybox = linux_kernel.fetch_busybox()
    initramfs = build_busybox_initramfs(busybox, tmp_path / "initramfs.cpio")
    p = boot_full_linux(vmm_process, cloud_kernel, initramfs, "--cpus", "boot=1")
    p.serial.expect(rb"VMMPY-LINUX-UP cpus=1", 120)
    before = sum(map(int, p.serial.command("ged", GED_INTERRUPTS).group(1).split()))
    assert p.api.request("PUT", "/api/v1/vm.power-button")[0] == 204
    deadline = time.monotonic() + 30
    while sum(map(int, p.serial.command("ged", GED_INTERRUPTS).group(1).split())) == before:
        assert time.monotonic() < deadline, "the GED interrupt never reached Linux"
        time.sleep(0.1)
    p.serial.command("echo after the press", rb"VMMPY-ECHO echo after the press")
    assert b"IRQ method execution failed" not in p.serial.buf and b"ACPI Error" not in p.serial.buf


# ------------------------------------------------------------------------------------------------
# Full boot with a virtio disk (hardware KVM only): Debian's virtio_pci and virtio_blk modules in a
# busybox initramfs; the first boot writes a file on the disk's ext4 and reboots, the second boot
# reads it back and powers off; then the host reads the file out of the image itself.

VIRTIO_MODULES = ("virtio", "virtio_ring", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci")

DISK_INIT_SCRIPT = """#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
for m in $($bb cat /modules/order); do $bb insmod /modules/$m.ko || echo "VMMPY-INSMOD-FAILED $m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do $bb sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || { echo VMMPY-NO-DISK; $bb poweroff -f; }
$bb mkdir -p /mnt
$bb mount -t ext4 /dev/vda /mnt || echo VMMPY-MOUNT-FAILED
if [ -f /mnt/hello.txt ]; then
  echo "VMMPY-READBACK $($bb cat /mnt/hello.txt)"
  $bb umount /mnt
  $bb poweroff -f
fi
echo "@TOKEN@" > /mnt/hello.txt
$bb sync
$bb umount /mnt
echo VMMPY-WRITTEN
$bb reboot -f
"""


def build_module_initramfs(busybox: Path, modules: Path, wanted: tuple[str, ...], init: str, dest: Path) -> Path:
    """A busybox initramfs with those of the kernel's `wanted` modules it builds as modules (in
    dependency order; the last one must be there) and `init` as /init."""
    import lzma

    found = {p.name.split(".ko")[0].replace("-", "_"): p for p in modules.rglob("*.ko*")}
    d = stat.S_IFDIR | 0o755
    entries = [(n, d, b"", 0, 0) for n in ("bin", "dev", "proc", "sys", "mnt", "modules")]
    order = []
    for name in wanted:
        path = found.get(name)
        if path is None:
            continue
        data = path.read_bytes()
        if path.name.endswith(".xz"):
            data = lzma.decompress(data)
        assert path.name.endswith((".ko", ".ko.xz")), f"busybox insmod cannot load {path.name}"
        entries.append((f"modules/{name}.ko", stat.S_IFREG | 0o644, data, 0, 0))
        order.append(name)
    assert wanted[-1] in order, f"no {wanted[-1]} module under {modules}"
    entries += [
        ("modules/order", stat.S_IFREG | 0o644, " ".join(order).encode(), 0, 0),
        ("dev/console", stat.S_IFCHR | 0o600, b"", 5, 1),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes(), 0, 0),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox", 0, 0),
        ("init", stat.S_IFREG | 0o755, init.encode(), 0, 0),
    ]
    dest.write_bytes(_cpio_newc(entries))
    return dest


def test_full_boot_virtio_disk_write_sync_reboot_read(cloud_kernel, vmm_process, tmp_path):
    require_hardware_kvm()
    token = f"vmmpy-{os.urandom(8).hex()}"
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    # no metadata_csum: that would need the crc32c module in the initramfs too
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum", str(image)], check=True)
    modules = linux_kernel.fetch_kernel_modules("cloud")
    init = DISK_INIT_SCRIPT.replace("@TOKEN@", token)
    initramfs = build_module_initramfs(
        linux_kernel.fetch_busybox(), modules, VIRTIO_MODULES + ("virtio_blk",), init, tmp_path / "initramfs.cpio"
    )
    p = boot_full_linux(vmm_process, cloud_kernel, initramfs, "--cpus", "boot=2", "--disk", f"path={image},id=root")
    p.serial.expect(rb"VMMPY-WRITTEN", 180)
    p.wait_event("vm.rebooted", timeout=60)
    m = p.serial.expect(rb"VMMPY-READBACK (\S+)", 180)
    assert m.group(1).decode() == token
    assert b"VMMPY-INSMOD-FAILED" not in p.serial.buf and b"VMMPY-MOUNT-FAILED" not in p.serial.buf
    p.wait_event("vm.shutdown", timeout=60)
    assert p.wait_exit(30) == 0
    # the host's own reading of the image: the file is in the filesystem, synced
    out = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(image)], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == token


# ------------------------------------------------------------------------------------------------
# Full boot with a NIC (hardware KVM only): Debian's virtio_net in a busybox initramfs takes the
# address and answers the host's real ping across the test network's bridge.

NET_MODULES = VIRTIO_MODULES + ("failover", "net_failover", "virtio_net")

NET_INIT_SCRIPT = """#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
for m in $($bb cat /modules/order); do $bb insmod /modules/$m.ko || echo "VMMPY-INSMOD-FAILED $m"; done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 300 ]; do $bb sleep 0.1; i=$((i+1)); done
[ -e /sys/class/net/eth0 ] || { echo VMMPY-NO-NIC; $bb poweroff -f; }
$bb ip link set lo up
$bb ip addr add @IP@/24 dev eth0
$bb ip link set eth0 up
echo "VMMPY-NET-UP $($bb cat /sys/class/net/eth0/address)"
while true; do $bb sleep 3600; done
"""


def test_full_boot_virtio_net_answers_the_hosts_ping(cloud_kernel, vmm_process, network, tmp_path):
    require_hardware_kvm()
    tap = network.add_tap("taplinux")
    modules = linux_kernel.fetch_kernel_modules("cloud")
    init = NET_INIT_SCRIPT.replace("@IP@", GUEST_IP)
    initramfs = build_module_initramfs(linux_kernel.fetch_busybox(), modules, NET_MODULES, init, tmp_path / "i.cpio")
    p = boot_full_linux(
        vmm_process, cloud_kernel, initramfs, "--net", f"tap={tap},mac={GUEST_MAC},id=net0", netns=network.ns
    )
    m = p.serial.expect(rb"VMMPY-NET-UP (\S+)", 180)
    assert m.group(1).decode() == GUEST_MAC
    assert b"VMMPY-INSMOD-FAILED" not in p.serial.buf
    ping_answered(network, GUEST_IP, 5)
