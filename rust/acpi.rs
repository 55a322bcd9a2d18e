//! ACPI tables for a firmware-less x86-64 guest.
//!
//! The tables are laid out in the legacy BIOS area, starting at 0xe0000 (see
//! `docs/architecture.md`), in this order: RSDP, XSDT, FADT, DSDT, MADT, MCFG. Each table after the RSDP
//! starts on an 8-byte boundary. Everything must end below 1 MiB, where the kernel is loaded.
//!
//! The platform is described as *hardware-reduced* ACPI: there is no PM1 event/control block, no
//! GPE block, no SCI and no FACS. Power-off and reset go through the FADT's sleep-control and
//! reset registers, both on the ACPI shutdown device at port 0x600. On hardware-reduced platforms
//! Linux does not use the 8259 PICs nor the PIT as its timer: interrupts go through the IOAPIC.
//! Platform events (the power button) come from a Generic Event Device, `\_SB_.GED_`, whose
//! `_EVT` method reads the GED's event register and notifies the control-method power button
//! `\_SB_.PWRB` (Linux: drivers/acpi/evged.c, then the ACPI button driver).
//!
//! PCI: the MCFG table gives bus 0's ECAM region, and `\_SB_.PCI0` (PNP0A08, compatible with
//! PNP0A03) is the root bridge, whose `_CRS` lists bus 0, the config ports, the I/O window and the
//! 32-bit and 64-bit memory windows (docs/devices.md).
//!
//! What comes from the `acpi_tables` crate: the RSDP (both checksums), the FADT layout (ACPI 6.5,
//! 276 bytes) and its flags/GAS types, the generic `Sdt` buffer (length and checksum upkeep), the
//! MADT Processor Local APIC and I/O APIC entries, and all of the DSDT's AML. What is built here:
//! the creator id (the crate stamps its own "RVAT" into every header), the XSDT (built on `Sdt`
//! to carry our creator id), the MADT header (local APIC address and PCAT_COMPAT flags are not
//! settable through the crate's MADT builder) and the MADT's Interrupt Source Override and Local
//! APIC NMI entries, which the crate does not provide.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::devices::ged::{GED_GSI, POWER_BUTTON};
use crate::layout::{self, GED_MMIO_BASE};
use crate::memory::GuestMem;

/// Where the RSDP goes; Linux is told about it through boot_params.acpi_rsdp_addr (and would also
/// find it by scanning 0xe0000..0xfffff on 16-byte boundaries).
pub const ACPI_TABLES_START: u64 = 0xe0000;
/// The tables must end below this address (the kernel is loaded at 1 MiB).
pub const ACPI_TABLES_END: u64 = 0x10_0000;

pub const OEM_ID: [u8; 6] = *b"VMMPY ";
pub const OEM_TABLE_ID: [u8; 8] = *b"VMMPYVM ";
pub const OEM_REVISION: u32 = 1;
pub const CREATOR_ID: [u8; 4] = *b"VMPY";
pub const CREATOR_REVISION: u32 = 1;
/// FADT "Hypervisor Vendor Identity" (ACPI 6.0+).
pub const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"VMMPYKVM";

/// The ACPI shutdown device (devices/acpi_pm.rs): reset register and sleep control at 0x600,
/// sleep status at 0x601.
pub const ACPI_PM_PORT: u16 = 0x600;
pub const ACPI_RESET_PORT: u16 = ACPI_PM_PORT;
pub const ACPI_RESET_VALUE: u8 = 1;
pub const ACPI_SLEEP_CONTROL_PORT: u16 = ACPI_PM_PORT;
pub const ACPI_SLEEP_STATUS_PORT: u16 = ACPI_PM_PORT + 1;
/// SLP_TYP value for S5 (soft off) in `\_S5_`; the guest then writes (5 << 2) | SLP_EN(1 << 5) =
/// 0x34 to the sleep control register.
pub const S5_SLP_TYP: u8 = 5;

pub const LAPIC_ADDRESS: u32 = 0xfee0_0000;
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// KVM's in-kernel IOAPIC comes out of reset with ID 0. I/O APIC ids and local APIC ids live in
/// separate name spaces on xAPIC systems (interrupts are delivered as messages, not over a
/// shared APIC bus), and x86-64 Linux only checks I/O APIC ids against each other.
pub const IOAPIC_ID: u8 = 0;

/// Byte offset of the CMOS century register, advertised in the FADT.
const CMOS_CENTURY_INDEX: u8 = 0x32;

// FADT IA-PC boot architecture flags (ACPI 6.5, 5.2.9.3).
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

// MADT (ACPI 6.5, 5.2.12).
const MADT_REVISION: u8 = 5;
/// MADT flags bit 0: the platform also has dual 8259s. Left clear: on a hardware-reduced
/// platform the OS does not use the PICs (even though KVM's irqchip has them).
const MADT_FLAGS: u32 = 0;
const MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags: polarity active high (bits 1:0 = 01), trigger edge (bits 3:2 = 01).
const MPS_INTI_EDGE_ACTIVE_HIGH: u16 = 0x0005;
/// "All processors" in a Local APIC NMI entry.
const ALL_PROCESSORS: u8 = 0xff;

const RSDP_ALIGN: u64 = 16;
const TABLE_ALIGN: u64 = 8;
const HEADER_LEN: usize = 36;

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

/// A standard 36-byte table header carrying our OEM and creator ids; `len` is the size of the
/// fixed part of the table (header included), later grown with `Sdt::append_slice`.
fn new_sdt(signature: [u8; 4], len: u32, revision: u8) -> Sdt {
    let mut sdt = Sdt::new(signature, len, revision, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // The crate writes its own creator id; replace it (write_bytes keeps the checksum right).
    sdt.write_bytes(28, &CREATOR_ID);
    sdt.write_u32(32, CREATOR_REVISION);
    sdt
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut xsdt = new_sdt(*b"XSDT", HEADER_LEN as u32, 1);
    for entry in entries {
        xsdt.append_slice(&entry.to_le_bytes());
    }
    xsdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_byte_reg = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep button (there is no PM1 block to carry their events):
        // the power button is the control-method device PWRB in the DSDT.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.creator_id = CREATOR_ID;
    builder.creator_revision = CREATOR_REVISION.to_le_bytes();
    builder.iapc_boot_arch = (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT).into();
    // Ignored by the spec on hardware-reduced platforms, but Linux's CMOS clock code reads the
    // century byte from wherever this says.
    builder.century = CMOS_CENTURY_INDEX;
    builder.reset_reg = io_byte_reg(ACPI_RESET_PORT);
    builder.reset_value = ACPI_RESET_VALUE;
    builder.sleep_control_reg = io_byte_reg(ACPI_SLEEP_CONTROL_PORT);
    builder.sleep_status_reg = io_byte_reg(ACPI_SLEEP_STATUS_PORT);
    builder.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();

    let mut bytes = Vec::with_capacity(acpi_tables::fadt::FADT::len());
    builder.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// Append `Device (name) { _HID, [_UID,] _CRS }` to `sink`.
fn legacy_device(
    sink: &mut Vec<u8>,
    name: &str,
    hid: &str,
    uid: Option<u8>,
    resources: Vec<&dyn Aml>,
) {
    // `Name` serialises its value on construction, so these hold no borrows.
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new(hid));
    let uid = uid.map(|uid| aml::Name::new("_UID".into(), &uid));
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(resources));

    let mut children: Vec<&dyn Aml> = vec![&hid];
    if let Some(uid) = &uid {
        children.push(uid);
    }
    children.push(&crs);
    aml::Device::new(name.into(), children).to_aml_bytes(sink);
}

/// Append the power button (`PWRB`, a control-method power button) and the Generic Event Device
/// that notifies it (`GED_`) to `sink`.
fn power_button_devices(sink: &mut Vec<u8>) {
    let uid_zero = aml::Name::new("_UID".into(), &aml::ZERO);
    aml::Device::new(
        "PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &uid_zero,
        ],
    )
    .to_aml_bytes(sink);

    // The GED's _CRS lists only its interrupt: Linux's GED driver takes every _CRS entry for
    // an interrupt to request. The event register is reached through an operation region.
    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
            true, true, false, false, GED_GSI,
        )]),
    );
    let region = aml::OpRegion::new(
        "EVRG".into(),
        aml::OpRegionSpace::SystemMemory,
        &GED_MMIO_BASE,
        &1u8,
    );
    let field = aml::Field::new(
        "EVRG".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"EVTS", 8)],
    );
    // Method (_EVT, 1, Serialized) { Local0 = EVTS; If (Local0 & POWER_BUTTON) { Notify (PWRB, 0x80) } }
    // 0x80: "status change", which the button driver reports as a power-button press.
    let (events, register, button) = (
        aml::Local(0),
        aml::Path::new("EVTS"),
        aml::Path::new("\\_SB_.PWRB"),
    );
    let read = aml::Store::new(&events, &register);
    let power_button = aml::And::new(&aml::ZERO, &events, &POWER_BUTTON);
    let notify = aml::Notify::new(&button, &0x80u8);
    let on_power_button = aml::If::new(&power_button, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &on_power_button]);
    aml::Device::new(
        "GED_".into(),
        vec![&hid, &uid_zero, &crs, &region, &field, &evt],
    )
    .to_aml_bytes(sink);
}

/// `\_SB_.PCI0`: the PCI root bridge of segment 0, bus 0, and the windows it forwards.
fn pci_root_device(sink: &mut Vec<u8>, ram_size: u64) {
    let mmio32_end = (layout::PCI_MMIO32_BASE + layout::PCI_MMIO32_SIZE - 1) as u32;
    let mmio64 = layout::pci_mmio64_base(ram_size);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0x0cf7u16, None);
    let io_high = aml::AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let mem32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO32_BASE as u32,
        mmio32_end,
        None,
    );
    let mem64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio64,
        mmio64 + layout::PCI_MMIO64_SIZE - 1,
        None,
    );
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&bus, &config_ports, &io_low, &io_high, &mem32, &mem64]),
    );
    aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &crs,
        ],
    )
    .to_aml_bytes(sink);
}

/// MCFG (PCI Firmware 3.0 §4.1.2): after the header 8 reserved bytes, then one allocation: bus 0's
/// ECAM base, segment 0, buses 0..=0.
fn mcfg() -> Vec<u8> {
    let mut mcfg = new_sdt(*b"MCFG", HEADER_LEN as u32 + 8, 1);
    let mut entry = [0u8; 16];
    entry[0..8].copy_from_slice(&layout::PCI_ECAM_BASE.to_le_bytes());
    mcfg.append_slice(&entry);
    mcfg.as_slice().to_vec()
}

/// The DSDT's AML: `\_S5_` and, under `\_SB_`, COM1, the PS/2 keyboard controller, the RTC, the
/// power button, the Generic Event Device and the PCI root bridge.
fn dsdt_aml(ram_size: u64) -> Vec<u8> {
    let mut devices = Vec::new();

    // 16550 UART, COM1. An extended interrupt descriptor: consumer, edge, active high, exclusive.
    legacy_device(
        &mut devices,
        "COM1",
        "PNP0501",
        Some(0),
        vec![
            &aml::IO::new(0x3f8, 0x3f8, 1, 8),
            &aml::Interrupt::new(true, true, false, false, 4),
        ],
    );

    // i8042 keyboard controller: data port first, then command/status port, each one byte long
    // (the layout Linux's i8042 PnP probe expects), and IRQ 1.
    legacy_device(
        &mut devices,
        "PS2K",
        "PNP0303",
        None,
        vec![
            &aml::IO::new(0x60, 0x60, 1, 1),
            &aml::IO::new(0x64, 0x64, 1, 1),
            &aml::Interrupt::new(true, true, false, false, 1),
        ],
    );

    // MC146818 RTC/CMOS. No interrupt: the device never raises IRQ 8.
    legacy_device(
        &mut devices,
        "RTC_",
        "PNP0B00",
        None,
        vec![&aml::IO::new(0x70, 0x70, 1, 2)],
    );

    power_button_devices(&mut devices);
    pci_root_device(&mut devices, ram_size);

    let mut bytes = aml::Scope::raw("\\_SB_".into(), devices);

    // Package (SLP_TYPa, SLP_TYPb, reserved, reserved). Only SLP_TYPa is used on a
    // hardware-reduced platform.
    let zero: u8 = 0;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &zero, &zero]),
    )
    .to_aml_bytes(&mut bytes);

    bytes
}

fn dsdt(ram_size: u64) -> Vec<u8> {
    // Revision 2: AML integers are 64 bits wide.
    let mut dsdt = new_sdt(*b"DSDT", HEADER_LEN as u32, 2);
    dsdt.append_slice(&dsdt_aml(ram_size));
    dsdt.as_slice().to_vec()
}

/// MADT Interrupt Source Override (type 2, 10 bytes): ISA `source` is wired to `gsi`.
fn interrupt_source_override(source: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut entry = [0u8; 10];
    entry[0] = MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE;
    entry[1] = entry.len() as u8;
    entry[2] = 0; // bus: ISA
    entry[3] = source;
    entry[4..8].copy_from_slice(&gsi.to_le_bytes());
    entry[8..10].copy_from_slice(&flags.to_le_bytes());
    entry
}

/// MADT Local APIC NMI (type 4, 6 bytes): `lint` of processor `uid` (0xff: all) carries NMI.
fn local_apic_nmi(uid: u8, flags: u16, lint: u8) -> [u8; 6] {
    let mut entry = [0u8; 6];
    entry[0] = MADT_TYPE_LOCAL_APIC_NMI;
    entry[1] = entry.len() as u8;
    entry[2] = uid;
    entry[3..5].copy_from_slice(&flags.to_le_bytes());
    entry[5] = lint;
    entry
}

fn madt(vcpus: u8) -> Vec<u8> {
    // Header, then the local interrupt controller address and the flags.
    let mut madt = new_sdt(*b"APIC", HEADER_LEN as u32 + 8, MADT_REVISION);
    madt.write_u32(36, LAPIC_ADDRESS);
    madt.write_u32(40, MADT_FLAGS);

    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        // ACPI processor UID = APIC id = vCPU index (KVM's default APIC id is the vCPU id).
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(IOAPIC_ID, IOAPIC_ADDRESS, 0).to_aml_bytes(&mut entries);
    // The PIT's IRQ 0 is wired to IOAPIC pin 2, as on every PC (and KVM's in-kernel PIT).
    entries.extend_from_slice(&interrupt_source_override(0, 2, MPS_INTI_EDGE_ACTIVE_HIGH));
    // LINT1 of every local APIC is the NMI input.
    entries.extend_from_slice(&local_apic_nmi(
        ALL_PROCESSORS,
        MPS_INTI_EDGE_ACTIVE_HIGH,
        1,
    ));

    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

/// Write `bytes` at `addr`, refusing anything that would reach `ACPI_TABLES_END`.
fn write_table(mem: &GuestMem, addr: u64, bytes: &[u8]) -> Result<(), GuestMemoryError> {
    let end = addr + bytes.len() as u64;
    if end > ACPI_TABLES_END {
        return Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(end - 1)));
    }
    mem.write_slice(bytes, GuestAddress(addr))
}

/// Build RSDP, XSDT, FADT, DSDT, MADT and MCFG for `vcpus` vCPUs (APIC ids 0..vcpus) and a guest
/// of `ram_size` bytes (the 64-bit PCI window lies above its RAM), and write them into guest
/// memory from 0xe0000 up. Returns the RSDP's guest physical address.
pub fn create_acpi_tables(
    mem: &GuestMem,
    vcpus: u8,
    ram_size: u64,
) -> Result<GuestAddress, GuestMemoryError> {
    let dsdt = dsdt(ram_size);
    let madt = madt(vcpus);
    let mcfg = mcfg();
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let xsdt_len = (HEADER_LEN + 3 * 8) as u64;

    let rsdp_addr = align_up(ACPI_TABLES_START, RSDP_ALIGN);
    let xsdt_addr = align_up(rsdp_addr + Rsdp::len() as u64, TABLE_ALIGN);
    let fadt_addr = align_up(xsdt_addr + xsdt_len, TABLE_ALIGN);
    let dsdt_addr = align_up(fadt_addr + fadt_len, TABLE_ALIGN);
    let madt_addr = align_up(dsdt_addr + dsdt.len() as u64, TABLE_ALIGN);
    let mcfg_addr = align_up(madt_addr + madt.len() as u64, TABLE_ALIGN);

    let fadt = fadt(dsdt_addr);
    let xsdt = xsdt(&[fadt_addr, madt_addr, mcfg_addr]);
    debug_assert_eq!(fadt.len() as u64, fadt_len);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);

    let mut rsdp = Vec::with_capacity(Rsdp::len());
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);

    // Check the whole block first so that nothing is written when it does not fit.
    let end = mcfg_addr + mcfg.len() as u64;
    if end > ACPI_TABLES_END {
        return Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(end - 1)));
    }
    write_table(mem, rsdp_addr, &rsdp)?;
    write_table(mem, xsdt_addr, &xsdt)?;
    write_table(mem, fadt_addr, &fadt)?;
    write_table(mem, dsdt_addr, &dsdt)?;
    write_table(mem, madt_addr, &madt)?;
    write_table(mem, mcfg_addr, &mcfg)?;
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn read(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    /// Read a whole table at `addr`, check its header and checksum, return its bytes.
    fn table(mem: &GuestMem, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, addr, HEADER_LEN);
        assert_eq!(&header[0..4], signature);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= HEADER_LEN);
        assert!(addr + len as u64 <= ACPI_TABLES_END);
        let bytes = read(mem, addr, len);
        assert_eq!(
            sum(&bytes),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        assert_eq!(&bytes[10..16], &OEM_ID);
        assert_eq!(&bytes[16..24], &OEM_TABLE_ID);
        assert_eq!(&bytes[28..32], &CREATOR_ID);
        bytes
    }

    struct Tables {
        xsdt: Vec<u8>,
        fadt: Vec<u8>,
        dsdt: Vec<u8>,
        madt: Vec<u8>,
        mcfg: Vec<u8>,
    }

    fn build(vcpus: u8) -> Tables {
        let mem = guest_mem();
        let rsdp_addr = create_acpi_tables(&mem, vcpus, 1 << 30).unwrap();
        assert_eq!(rsdp_addr.0, 0xe0000);
        assert_eq!(rsdp_addr.0 % 16, 0);

        let rsdp = read(&mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(&rsdp[9..15], &OEM_ID);
        assert_eq!(rsdp[15], 2);
        assert_eq!(u32_at(&rsdp, 20), 36);

        let xsdt_addr = u64_at(&rsdp, 24);
        assert!(xsdt_addr > rsdp_addr.0);
        let xsdt = table(&mem, xsdt_addr, b"XSDT");
        assert_eq!(xsdt.len(), HEADER_LEN + 24);
        let fadt_addr = u64_at(&xsdt, 36);
        let madt_addr = u64_at(&xsdt, 44);
        let fadt = table(&mem, fadt_addr, b"FACP");
        let dsdt_addr = u64_at(&fadt, 140);
        let dsdt = table(&mem, dsdt_addr, b"DSDT");
        let madt = table(&mem, madt_addr, b"APIC");
        let mcfg_addr = u64_at(&xsdt, 52);
        let mcfg = table(&mem, mcfg_addr, b"MCFG");
        assert!(madt_addr + madt.len() as u64 <= mcfg_addr);
        // Laid out in the documented order, without overlaps.
        assert!(xsdt_addr + xsdt.len() as u64 <= fadt_addr);
        assert!(fadt_addr + fadt.len() as u64 <= dsdt_addr);
        assert!(dsdt_addr + dsdt.len() as u64 <= madt_addr);
        Tables {
            xsdt,
            fadt,
            dsdt,
            madt,
            mcfg,
        }
    }

    #[test]
    fn rsdp_xsdt_and_checksums() {
        for vcpus in [1u8, 2, 4, 64, 255] {
            let t = build(vcpus);
            assert_eq!(t.xsdt[8], 1);
        }
    }

    #[test]
    fn fadt_fields() {
        let f = build(2).fadt;
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6); // major revision
        assert_eq!(f[131], 5); // minor revision
        assert_eq!(u32_at(&f, 40), 0); // 32-bit DSDT pointer unused, X_DSDT is set
        let flags = u32_at(&f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let boot_arch = u16::from_le_bytes([f[109], f[110]]);
        assert_eq!(boot_arch, 0x0006);
        assert_eq!(f[108], 0x32); // century
                                  // Reset register: System I/O, 8 bits, offset 0, byte access, port 0x600; value 1.
        assert_eq!(&f[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&f, 120), 0x600);
        assert_eq!(f[128], 1);
        // Sleep control (0x600) and sleep status (0x601) registers.
        assert_eq!(&f[244..248], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&f, 248), 0x600);
        assert_eq!(&f[256..260], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&f, 260), 0x601);
        assert_eq!(&f[268..276], b"VMMPYKVM");
    }

    #[test]
    fn madt_entries() {
        let vcpus = 4u8;
        let m = build(vcpus).madt;
        assert_eq!(u32_at(&m, 36), 0xfee0_0000);
        assert_eq!(u32_at(&m, 40), MADT_FLAGS);
        let mut off = 44;
        let mut lapics = Vec::new();
        let (mut ioapics, mut isos, mut nmis) = (0, 0, 0);
        while off < m.len() {
            let (kind, len) = (m[off], m[off + 1] as usize);
            assert!(len >= 2 && off + len <= m.len());
            let e = &m[off..off + len];
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    assert_eq!(e[2], e[3]);
                    assert_eq!(u32_at(e, 4), 1);
                    lapics.push(e[3]);
                }
                1 => {
                    assert_eq!(len, 12);
                    assert_eq!(e[2], IOAPIC_ID);
                    assert_eq!(u32_at(e, 4), 0xfec0_0000);
                    assert_eq!(u32_at(e, 8), 0);
                    ioapics += 1;
                }
                2 => {
                    assert_eq!(len, 10);
                    assert_eq!((e[2], e[3]), (0, 0));
                    assert_eq!(u32_at(e, 4), 2);
                    assert_eq!(u16::from_le_bytes([e[8], e[9]]), 0x0005);
                    isos += 1;
                }
                4 => {
                    assert_eq!(len, 6);
                    assert_eq!(e[2], 0xff);
                    assert_eq!(e[5], 1);
                    nmis += 1;
                }
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(off, m.len());
        assert_eq!(lapics, (0..vcpus).collect::<Vec<_>>());
        assert_eq!((ioapics, isos, nmis), (1, 1, 1));
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_contents() {
        let d = build(1).dsdt;
        assert_eq!(d[8], 2);
        let aml = &d[HEADER_LEN..];
        // Scope (\_SB_) comes first.
        assert_eq!(aml[0], 0x10);
        assert!(contains(aml, b"\\_SB_"));
        for name in [&b"COM1"[..], b"PS2K", b"RTC_", b"_HID", b"_CRS", b"_UID"] {
            assert!(contains(aml, name), "{}", String::from_utf8_lossy(name));
        }
        // EISA ids as encoded by EisaId(): PNP0501, PNP0303, PNP0B00.
        assert!(contains(aml, &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        assert!(contains(aml, &[0x0c, 0x41, 0xd0, 0x03, 0x03]));
        assert!(contains(aml, &[0x0c, 0x41, 0xd0, 0x0b, 0x00]));
        // IO descriptors: 0x3f8/8, 0x60/1, 0x64/1, 0x70/2.
        assert!(contains(
            aml,
            &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        ));
        assert!(contains(
            aml,
            &[0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01]
        ));
        assert!(contains(
            aml,
            &[0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01]
        ));
        assert!(contains(
            aml,
            &[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02]
        ));
        // Extended interrupt descriptors for IRQ 4 and IRQ 1 (consumer, edge, high, exclusive).
        assert!(contains(
            aml,
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00]
        ));
        assert!(contains(
            aml,
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x01, 0x00, 0x00, 0x00]
        ));
        // PWRB: EisaId ("PNP0C0C"). GED_: _HID "ACPI0013" (a string) and an edge, active-high,
        // exclusive consumer interrupt on GSI 5 as its only resource.
        assert!(contains(aml, &[0x0c, 0x41, 0xd0, 0x0c, 0x0c]));
        assert!(contains(aml, b"\x08_HID\x0dACPI0013\x00"));
        assert!(contains(
            aml,
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00, 0x79]
        ));
        // OperationRegion (EVRG, SystemMemory, 0xfeb00000, 1); Field (EVRG, ByteAcc, NoLock,
        // WriteAsZeros) { EVTS, 8 }.
        assert!(contains(aml, b"\x5b\x80EVRG\x00\x0c\x00\x00\xb0\xfe\x01"));
        assert!(contains(aml, b"EVRG\x41EVTS\x08"));
        // _EVT (1 argument, serialized): Local0 = EVTS; If (Local0 & 8) { Notify (\_SB_.PWRB, 0x80) }.
        assert!(contains(aml, b"_EVT\x09\x70EVTS\x60\xa0"));
        assert!(contains(
            aml,
            b"\x7b\x60\x0a\x08\x00\x86\x5c\x2e_SB_PWRB\x0a\x80"
        ));
        // Name (_S5_, Package (4) {5, 5, 0, 0}) at the root.
        assert!(contains(
            aml,
            &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00]
        ));
    }

    #[test]
    fn refuses_memory_without_the_bios_area() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0xa0000)]).unwrap();
        assert!(create_acpi_tables(&mem, 1, 1 << 30).is_err());
    }

    #[test]
    fn mcfg_gives_bus_0_ecam() {
        let m = build(1).mcfg;
        assert_eq!(m.len(), HEADER_LEN + 8 + 16);
        assert_eq!(m[8], 1);
        assert_eq!(u64_at(&m, 44), layout::PCI_ECAM_BASE);
        assert_eq!(&m[52..56], &[0, 0, 0, 0], "segment 0, buses 0..=0");
    }

    #[test]
    fn dsdt_pci_root_bridge() {
        let d = build(1).dsdt;
        let aml = &d[HEADER_LEN..];
        assert!(contains(aml, b"PCI0"));
        // _HID EisaId ("PNP0A08"), _CID EisaId ("PNP0A03").
        assert!(contains(aml, b"_HID\x0c\x41\xd0\x0a\x08"));
        assert!(contains(aml, b"_CID\x0c\x41\xd0\x0a\x03"));
        // WordBusNumber 0..0: type 2, min/max fixed, length 0x0d.
        assert!(contains(
            aml,
            &[0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]
        ));
        // The config ports, then WordIO 0..0xcf7.
        assert!(contains(
            aml,
            &[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]
        ));
        assert!(contains(
            aml,
            &[0x88, 0x0d, 0x00, 0x01, 0x0c, 0x03, 0x00, 0x00, 0x00, 0x00, 0xf7, 0x0c]
        ));
        // DWordMemory 0xc0000000..0xdfffffff and QWordMemory from 4 GiB (1 GiB of RAM).
        assert!(contains(
            aml,
            &[
                0x87, 0x17, 0x00, 0x00, 0x0c, 0x01, 0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff, 0xff,
                0xdf
            ]
        ));
        let mut q = vec![0x8a, 0x2b, 0x00, 0x00, 0x0c, 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
        q.extend(layout::FOUR_GIB.to_le_bytes());
        q.extend((layout::FOUR_GIB + layout::PCI_MMIO64_SIZE - 1).to_le_bytes());
        assert!(contains(aml, &q));
    }
}
