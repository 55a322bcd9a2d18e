"""The ACPI tables vmmpy gives a guest, read back from guest memory and decoded the way acpidump +
iasl would: RSDP at boot_params.acpi_rsdp_addr → XSDT → FADT → DSDT, and the MADT. Checksums,
the hardware-reduced FADT (reset register, sleep control/status at the shutdown device), one
Local APIC per vCPU, and a DSDT whose AML declares `\\_S5_`, COM1 (PNP0501) and the i8042
(PNP0303) with the resources the devices really use, and the power button (PNP0C0C) with the
Generic Event Device (ACPI0013) whose `_EVT` method reads the GED's register and notifies it.
"""

from __future__ import annotations

import struct

import pytest

ZERO_PAGE = 0x7000
ACPI_RSDP_ADDR = 0x70  # boot_params.acpi_rsdp_addr
SHUTDOWN_PORT = 0x600
GED_MMIO = 0xFEB00000  # the GED's event register (docs/architecture.md)
GED_GSI = 5
GED_POWER_BUTTON = 0x08
PCI_ECAM = 0xE000_0000  # docs/devices.md


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


class Table:
    def __init__(self, mem: memoryview, addr: int):
        header = bytes(mem[addr : addr + 36])
        self.addr = addr
        self.signature = header[:4].decode()
        self.length = struct.unpack_from("<I", header, 4)[0]
        self.data = bytes(mem[addr : addr + self.length])
        self.revision = header[8]
        self.oem_id = header[10:16].decode()
        self.oem_table_id = header[16:24].decode()
        self.oem_revision = struct.unpack_from("<I", header, 24)[0]
        self.creator_id = header[28:32].decode()

    def __str__(self) -> str:  # the line Linux prints for it
        return (
            f"{self.signature} {self.addr:#018X} {self.length:06X} (v{self.revision:02d} {self.oem_id} "
            f"{self.oem_table_id} {self.oem_revision:08X} {self.creator_id})"
        )


# ---- a small AML decoder: the subset vmmpy's DSDT uses ------------------------------------------


def eisa_id(value: int) -> str:
    """Decode a compressed EISA id (as EisaId() stores it) back to text, e.g. PNP0501."""
    b = value.to_bytes(4, "little")
    vendor = (b[0] << 8) | b[1]
    letters = "".join(chr(0x40 + ((vendor >> s) & 0x1F)) for s in (10, 5, 0))
    return letters + f"{b[2]:02X}{b[3]:02X}"


class Aml:
    def __init__(self, data: bytes):
        self.data = data

    def pkg_length(self, pos: int) -> tuple[int, int]:
        """(length, position after the PkgLength encoding). The length counts its own bytes."""
        lead = self.data[pos]
        extra = lead >> 6
        if extra == 0:
            return lead & 0x3F, pos + 1
        length = lead & 0x0F
        for i in range(extra):
            length |= self.data[pos + 1 + i] << (4 + 8 * i)
        return length, pos + 1 + extra

    def name_string(self, pos: int) -> tuple[str, int]:
        prefix = ""
        while self.data[pos] in (0x5C, 0x5E):  # root, parent
            prefix += chr(self.data[pos])
            pos += 1
        lead = self.data[pos]
        if lead == 0x00:
            return prefix, pos + 1
        if lead == 0x2E:  # DualNamePrefix
            segs, pos = 2, pos + 1
        elif lead == 0x2F:  # MultiNamePrefix
            segs, pos = self.data[pos + 1], pos + 2
        else:
            segs = 1
        names = [self.data[pos + 4 * i : pos + 4 * i + 4].decode() for i in range(segs)]
        return prefix + ".".join(names), pos + 4 * segs

    def data_object(self, pos: int):
        op = self.data[pos]
        if op == 0x00:
            return 0, pos + 1
        if op == 0x01:
            return 1, pos + 1
        if op == 0xFF:
            return 0xFFFFFFFFFFFFFFFF, pos + 1
        if op == 0x0A:
            return self.data[pos + 1], pos + 2
        if op == 0x0B:
            return struct.unpack_from("<H", self.data, pos + 1)[0], pos + 3
        if op == 0x0C:
            return struct.unpack_from("<I", self.data, pos + 1)[0], pos + 5
        if op == 0x0E:
            return struct.unpack_from("<Q", self.data, pos + 1)[0], pos + 9
        if op == 0x0D:
            end = self.data.index(b"\0", pos + 1)
            return self.data[pos + 1 : end].decode(), end + 1
        if op == 0x11:  # Buffer: PkgLength, BufferSize, bytes
            length, body = self.pkg_length(pos + 1)
            end = pos + 1 + length
            size, body = self.data_object(body)
            return ("buffer", self.data[body:end][:size]), end
        if op == 0x12:  # Package: PkgLength, NumElements, elements
            length, body = self.pkg_length(pos + 1)
            end = pos + 1 + length
            count, body = self.data[body], body + 1
            items = []
            while body < end:
                item, body = self.data_object(body)
                items.append(item)
            assert len(items) == count
            return ("package", items), end
        raise AssertionError(f"AML data object {op:#x} at {pos} not understood")

    @staticmethod
    def join(scope: str, name: str) -> str:
        if name.startswith("\\"):
            return name
        return f"{scope}{name}" if scope.endswith("\\") else f"{scope}.{name}"

    def terms(self, pos: int, end: int, scope: str, out: dict) -> None:
        """Walks Scope / Device / Name / Method / OperationRegion / Field terms; out maps absolute
        name paths to values (a dict with "kind" for all but Name)."""
        while pos < end:
            op = self.data[pos]
            if op == 0x10 or (op == 0x5B and self.data[pos + 1] == 0x82):  # Scope, Device
                start = pos + (1 if op == 0x10 else 2)
                length, body = self.pkg_length(start)
                name, body = self.name_string(body)
                path = self.join(scope, name)
                out[path] = {"kind": "Scope" if op == 0x10 else "Device"}
                self.terms(body, start + length, path, out)
                pos = start + length
            elif op == 0x08:  # Name
                name, body = self.name_string(pos + 1)
                value, pos = self.data_object(body)
                out[self.join(scope, name)] = value
            elif op == 0x14:  # Method: PkgLength, name, flags (argument count, serialized), body
                length, body = self.pkg_length(pos + 1)
                name, body = self.name_string(body)
                flags = self.data[body]
                out[self.join(scope, name)] = {
                    "kind": "Method",
                    "args": flags & 7,
                    "serialized": bool(flags & 8),
                    "body": self.statements(body + 1, pos + 1 + length),
                }
                pos = pos + 1 + length
            elif op == 0x5B and self.data[pos + 1] == 0x80:  # OperationRegion: name, space, offset, length
                name, body = self.name_string(pos + 2)
                space = self.data[body]
                offset, body = self.data_object(body + 1)
                length, pos = self.data_object(body)
                out[self.join(scope, name)] = {
                    "kind": "OperationRegion",
                    "space": space,
                    "offset": offset,
                    "length": length,
                }
            elif op == 0x5B and self.data[pos + 1] == 0x81:  # Field: PkgLength, region, flags, units
                length, body = self.pkg_length(pos + 2)
                field_end = pos + 2 + length
                region, body = self.name_string(body)
                flags, body, bit = self.data[body], body + 1, 0
                while body < field_end:
                    if self.data[body] == 0x00:  # reserved bits
                        bits, body = self.pkg_length(body + 1)
                    else:
                        unit = self.data[body : body + 4].decode()
                        bits, body = self.pkg_length(body + 4)
                        out[self.join(scope, unit)] = {
                            "kind": "Field",
                            "region": self.join(scope, region),
                            "flags": flags,
                            "bit": bit,
                            "bits": bits,
                        }
                    bit += bits
                pos = field_end
            else:
                raise AssertionError(f"AML opcode {op:#x} at {pos} not understood")

    def term(self, pos: int) -> tuple[str, int]:
        """One expression of a method body as ASL-like text: the operators vmmpy's methods use."""
        op = self.data[pos]
        if 0x60 <= op <= 0x67:
            return f"Local{op - 0x60}", pos + 1
        if op == 0x7B:  # And (a, b, target)
            a, pos = self.term(pos + 1)
            b, pos = self.term(pos)
            target, pos = self.term(pos)
            return f"And ({a}, {b}, {target})", pos
        if op in (0x5C, 0x5E, 0x2E, 0x2F) or chr(op).isupper() or op == ord("_"):
            return self.name_string(pos)
        value, pos = self.data_object(pos)
        return ("Zero" if value == 0 else f"{value:#x}"), pos

    def statements(self, pos: int, end: int) -> list:
        """A method body: Store, If, Notify statements (If bodies nested as lists)."""
        out = []
        while pos < end:
            op = self.data[pos]
            if op == 0x70:  # Store (source, target)
                source, pos = self.term(pos + 1)
                target, pos = self.term(pos)
                out.append(f"Store ({source}, {target})")
            elif op == 0x86:  # Notify (object, value)
                target, pos = self.term(pos + 1)
                value, pos = self.term(pos)
                out.append(f"Notify ({target}, {value})")
            elif op == 0xA0:  # If: PkgLength, predicate, body
                length, body = self.pkg_length(pos + 1)
                predicate, body = self.term(body)
                out.append((f"If ({predicate})", self.statements(body, pos + 1 + length)))
                pos = pos + 1 + length
            else:
                raise AssertionError(f"AML statement {op:#x} at {pos} not understood")
        return out


def resources(buffer: bytes) -> list[tuple]:
    """Decodes a resource template: IO ports, extended interrupts; stops at the end tag."""
    out, pos = [], 0
    while pos < len(buffer):
        tag = buffer[pos]
        if tag & 0x80:  # large item
            length = struct.unpack_from("<H", buffer, pos + 1)[0]
            body = buffer[pos + 3 : pos + 3 + length]
            if tag == 0x89:  # Extended Interrupt
                flags, count = body[0], body[1]
                irqs = list(struct.unpack_from(f"<{count}I", body, 2))
                out.append(("Interrupt", flags, irqs))
            elif tag in (0x88, 0x87, 0x8A):  # Word / DWord / QWord address space
                width = {0x88: "H", 0x87: "I", 0x8A: "Q"}[tag]
                kind = {0: "Memory", 1: "IO", 2: "BusNumber"}[body[0]]
                _gran, lo, hi, _tra, size = struct.unpack_from(f"<5{width}", body, 3)
                assert size == hi - lo + 1, "length matches the range"
                out.append((kind, lo, hi))
            else:
                out.append(("large", tag))
            pos += 3 + length
        else:
            kind, length = (tag >> 3) & 0x0F, tag & 0x07
            body = buffer[pos + 1 : pos + 1 + length]
            if kind == 0x08:  # IO
                lo, hi, align, size = struct.unpack_from("<HHBB", body, 1)
                out.append(("IO", lo, hi, align, size))
            elif kind == 0x0F:  # end tag
                assert checksum(buffer[: pos + 2]) == 0 or body[0] == 0
                return out
            else:
                out.append(("small", kind))
            pos += 1 + length
    raise AssertionError("resource template without an end tag")


# ---- the test --------------------------------------------------------------------------------------


@pytest.fixture
def acpi(guest_vmm):
    # The 64-bit entry: the RSDP's address is then in the zero page (PVH has it in hvm_start_info,
    # tests/test_boot.py).
    vmm, serial = guest_vmm(vcpus=3, boot_protocol="linux64")
    serial.wait_ready()
    (low, *_) = vmm.memory_regions()
    mem = memoryview(low)
    yield mem
    mem.release()


def test_acpi_tables_from_guest_memory(acpi):
    mem = acpi
    rsdp_addr = struct.unpack_from("<Q", mem, ZERO_PAGE + ACPI_RSDP_ADDR)[0]
    assert rsdp_addr == 0xE0000 and rsdp_addr % 16 == 0
    rsdp = bytes(mem[rsdp_addr : rsdp_addr + 36])
    assert rsdp[:8] == b"RSD PTR "
    assert checksum(rsdp[:20]) == 0 and checksum(rsdp) == 0
    assert rsdp[9:15] == b"VMMPY " and rsdp[15] == 2 and struct.unpack_from("<I", rsdp, 20)[0] == 36
    print(f"\nRSDP {rsdp_addr:#018X} 000024 (v02 {rsdp[9:15].decode()})")

    xsdt = Table(mem, struct.unpack_from("<Q", rsdp, 24)[0])
    tables = {"XSDT": xsdt}
    entries = [struct.unpack_from("<Q", xsdt.data, 36 + 8 * i)[0] for i in range((xsdt.length - 36) // 8)]
    for addr in entries:
        t = Table(mem, addr)
        tables[t.signature] = t
    fadt = tables["FACP"]
    dsdt = tables["DSDT"] = Table(mem, struct.unpack_from("<Q", fadt.data, 140)[0])
    assert sorted(tables) == ["APIC", "DSDT", "FACP", "MCFG", "XSDT"]
    for t in tables.values():
        print(t)
        assert checksum(t.data) == 0, f"{t.signature} checksum"
        assert (t.oem_id, t.oem_table_id, t.creator_id) == ("VMMPY ", "VMMPYVM ", "VMPY")
        assert 0xE0000 <= t.addr and t.addr + t.length <= 0x100000

    # FADT: ACPI 6.5 layout, hardware-reduced, reset and sleep registers at the shutdown device.
    f = fadt.data
    assert fadt.length == 276 and fadt.revision == 6 and f[131] == 5
    flags = struct.unpack_from("<I", f, 112)[0]
    assert flags & (1 << 20), "HW_REDUCED_ACPI"
    assert flags & (1 << 10), "RESET_REG_SUP"
    assert struct.unpack_from("<Q", f, 140)[0] == dsdt.addr and struct.unpack_from("<I", f, 40)[0] == 0

    def gas(off):  # Generic Address Structure: space, bit width, bit offset, access size, address
        return struct.unpack_from("<BBBBQ", f, off)

    system_io, byte_access = 1, 1
    assert gas(116) == (system_io, 8, 0, byte_access, SHUTDOWN_PORT)  # RESET_REG
    assert f[128] == 1  # RESET_VALUE
    assert gas(244) == (system_io, 8, 0, byte_access, SHUTDOWN_PORT)  # SLEEP_CONTROL_REG
    assert gas(256) == (system_io, 8, 0, byte_access, SHUTDOWN_PORT + 1)  # SLEEP_STATUS_REG
    assert struct.unpack_from("<H", f, 109)[0] & 0x2, "IAPC_BOOT_ARCH: 8042 present"
    # No PM1/GPE blocks or SCI on a hardware-reduced platform.
    assert struct.unpack_from("<H", f, 46)[0] == 0 and struct.unpack_from("<I", f, 56)[0] == 0

    # MADT: a Local APIC per vCPU (3), an I/O APIC, IRQ0 → GSI2, LINT1 NMI.
    m = tables["APIC"].data
    assert struct.unpack_from("<I", m, 36)[0] == 0xFEE00000
    lapics, ioapics, overrides = [], [], []
    pos = 44
    while pos < len(m):
        kind, length = m[pos], m[pos + 1]
        if kind == 0:
            uid, apic_id, lflags = struct.unpack_from("<BBI", m, pos + 2)
            lapics.append((uid, apic_id, lflags))
        elif kind == 1:
            ioapics.append(struct.unpack_from("<BxII", m, pos + 2))
        elif kind == 2:
            overrides.append(struct.unpack_from("<BBIH", m, pos + 2))
        pos += length
    assert pos == len(m)
    assert lapics == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
    assert ioapics == [(0, 0xFEC00000, 0)]
    assert overrides == [(0, 0, 2, 0x0005)]

    # DSDT: decode the AML.
    names: dict = {}
    aml = Aml(dsdt.data)
    aml.terms(36, dsdt.length, "\\", names)
    assert names["\\_S5_"] == ("package", [5, 5, 0, 0])
    devices = {
        path: names.get(f"{path}._HID") for path, v in names.items() if isinstance(v, dict) and v["kind"] == "Device"
    }
    hids = {path: hid if isinstance(hid, str) else eisa_id(hid) for path, hid in devices.items()}
    assert hids == {
        "\\_SB_.COM1": "PNP0501",
        "\\_SB_.PS2K": "PNP0303",
        "\\_SB_.RTC_": "PNP0B00",
        "\\_SB_.PWRB": "PNP0C0C",
        "\\_SB_.GED_": "ACPI0013",
        "\\_SB_.PCI0": "PNP0A08",
    }
    # The raw EISA encodings (what Linux's PNP layer matches on).
    assert bytes([0x0C, 0x41, 0xD0, 0x05, 0x01]) in dsdt.data
    assert bytes([0x0C, 0x41, 0xD0, 0x03, 0x03]) in dsdt.data
    crs = {path: resources(names[f"{path}._CRS"][1]) for path in devices if f"{path}._CRS" in names}
    edge_high_exclusive_consumer = 0x03
    assert crs["\\_SB_.COM1"] == [("IO", 0x3F8, 0x3F8, 1, 8), ("Interrupt", edge_high_exclusive_consumer, [4])]
    assert crs["\\_SB_.PS2K"] == [
        ("IO", 0x60, 0x60, 1, 1),
        ("IO", 0x64, 0x64, 1, 1),
        ("Interrupt", edge_high_exclusive_consumer, [1]),
    ]
    assert crs["\\_SB_.RTC_"] == [("IO", 0x70, 0x70, 1, 2)]

    # PCI: MCFG gives bus 0's ECAM; the root bridge (PNP0A08, compatible PNP0A03) forwards bus 0,
    # the config ports, the I/O space around them and the 32-bit and 64-bit windows (RAM is 512 MiB
    # here, so the 64-bit window starts at 4 GiB).
    mcfg = tables["MCFG"]
    assert mcfg.length == 36 + 8 + 16 and mcfg.revision == 1
    assert struct.unpack_from("<QHBB", mcfg.data, 44) == (PCI_ECAM, 0, 0, 0)
    assert eisa_id(names["\\_SB_.PCI0._CID"]) == "PNP0A03"
    assert (names["\\_SB_.PCI0._SEG"], names["\\_SB_.PCI0._BBN"], names["\\_SB_.PCI0._UID"]) == (0, 0, 0)
    assert crs["\\_SB_.PCI0"] == [
        ("BusNumber", 0, 0),
        ("IO", 0xCF8, 0xCF8, 1, 8),
        ("IO", 0x0000, 0x0CF7),
        ("IO", 0x0D00, 0xFFFF),
        ("Memory", 0xC000_0000, 0xDFFF_FFFF),
        ("Memory", 1 << 32, (1 << 32) + (64 << 30) - 1),
    ]

    # The power button: a control-method button (the FADT says there is no fixed-feature one).
    assert flags & (1 << 4), "PWR_BUTTON: no fixed-feature power button"
    assert names["\\_SB_.PWRB._UID"] == 0 and "\\_SB_.PWRB._CRS" not in names
    # The GED: only its interrupt in _CRS (Linux's evged requests an IRQ per _CRS entry), GSI 5.
    assert names["\\_SB_.GED_._UID"] == 0
    assert crs["\\_SB_.GED_"] == [("Interrupt", edge_high_exclusive_consumer, [GED_GSI])]
    system_memory, byte_acc_write_as_zeros = 0, 0x41
    assert names["\\_SB_.GED_.EVRG"] == {
        "kind": "OperationRegion",
        "space": system_memory,
        "offset": GED_MMIO,
        "length": 1,
    }
    assert names["\\_SB_.GED_.EVTS"] == {
        "kind": "Field",
        "region": "\\_SB_.GED_.EVRG",
        "flags": byte_acc_write_as_zeros,
        "bit": 0,
        "bits": 8,
    }
    evt = names["\\_SB_.GED_._EVT"]
    assert (evt["kind"], evt["args"], evt["serialized"]) == ("Method", 1, True)
    assert evt["body"] == [
        "Store (EVTS, Local0)",
        (f"If (And (Local0, {GED_POWER_BUTTON:#x}, Zero))", ["Notify (\\_SB_.PWRB, 0x80)"]),
    ]


def test_eisa_id_decoder():
    assert eisa_id(0x0105D041) == "PNP0501"
    assert eisa_id(0x0303D041) == "PNP0303"
