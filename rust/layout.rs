//! Guest physical layout (see docs/architecture.md): fixed addresses of the boot structures and
//! how guest RAM is split around the MMIO hole below 4 GiB.

pub const BOOT_GDT: u64 = 0x500;
pub const BOOT_IDT: u64 = 0x520;
/// PVH boot: `hvm_start_info`, then one module entry (the initramfs), then the memory map.
pub const PVH_START_INFO: u64 = 0x6000;
pub const PVH_MODLIST: u64 = 0x6040;
pub const PVH_MEMMAP: u64 = 0x6100;
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000; // four pages: the first 4 GiB in 2 MiB pages
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the MMIO hole below 4 GiB (IOAPIC, LAPIC, KVM's TSS and identity-map pages live there).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// The ACPI GED's event register page (devices/ged.rs), in the hole just below the IOAPIC.
pub const GED_MMIO_BASE: u64 = 0xfeb0_0000;
pub const GED_MMIO_SIZE: u64 = 0x1000;
/// PCI (docs/devices.md): ECAM for bus 0 (the ACPI MCFG table describes it), the 32-bit window
/// vmmpy allocates BARs from, and the I/O window the DSDT's root bridge describes.
pub const PCI_ECAM_BASE: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
pub const PCI_MMIO32_BASE: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// The 64-bit window the DSDT describes: from 64 GiB above the top of RAM's address space, 64 GiB.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// GSIs from here on carry MSI-X vectors (0-23 are the IOAPIC's pins).
pub const MSI_GSI_BASE: u32 = 24;
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// The RAM ranges (guest address, size) for `size` bytes of RAM: one range when it fits below the
/// hole, else a second range from 4 GiB on.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_HOLE_START), (FOUR_GIB, size - MMIO_HOLE_START)]
    }
}

/// Where the 64-bit PCI window starts: above guest RAM, on a 1 GiB boundary.
pub fn pci_mmio64_base(ram_size: u64) -> u64 {
    let top = ram_ranges(ram_size)
        .last()
        .map(|&(start, len)| start + len)
        .unwrap_or(FOUR_GIB)
        .max(FOUR_GIB);
    top.next_multiple_of(1 << 30)
}

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The e820 map vmmpy gives every guest: low RAM up to the EBDA, the EBDA and the ACPI/BIOS area
/// reserved, RAM from 1 MiB on, and RAM above 4 GiB when there is a hole.
pub fn e820_map(size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
        (ACPI_START, HIMEM_START - ACPI_START, E820_RESERVED),
        // Linux uses the MCFG's ECAM only where the firmware reserved it.
        (PCI_ECAM_BASE, PCI_ECAM_SIZE, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(size) {
        if start == 0 {
            map.push((HIMEM_START, len - HIMEM_START, E820_RAM));
        } else {
            map.push((start, len, E820_RAM));
        }
    }
    map.sort_by_key(|e| e.0);
    map
}
