//! The Linux boot_params "zero page": setup header, command line pointer, initramfs, e820 map and
//! the RSDP address (the 64-bit entry's boot information; the test guest reads it too when it is
//! entered that way), and the command line, which both boot protocols point at.

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::GuestAddress;

use super::payload::Payload;
use crate::error::{Error, Kind, Result};
use crate::layout;
use crate::memory::GuestMem;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

pub struct BootInputs<'a> {
    pub payload: &'a Payload,
    pub cmdline: &'a str,
    pub ram_size: u64,
    pub initramfs: Option<(u64, u64)>,
    pub rsdp: u64,
}

/// Writes the command line at `layout::CMDLINE`, within the kernel's limit.
pub fn write_cmdline(mem: &GuestMem, inp: &BootInputs) -> Result<()> {
    let limit = inp.payload.cmdline_limit.min(layout::CMDLINE_MAX);
    if inp.cmdline.len() + 1 > limit {
        return Err(Error::new(
            Kind::Payload,
            format!(
                "command line is {} bytes; this kernel accepts at most {}",
                inp.cmdline.len(),
                limit - 1
            ),
        ));
    }
    let mut cmdline =
        Cmdline::new(limit).map_err(|e| Error::new(Kind::Payload, format!("command line: {e}")))?;
    cmdline.insert_str(inp.cmdline).map_err(|e| {
        Error::new(
            Kind::Payload,
            format!("command line {:?}: {e}", inp.cmdline),
        )
    })?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE), &cmdline)
        .map_err(|e| Error::new(Kind::Payload, format!("writing the command line: {e}")))
}

pub fn write_zero_page(mem: &GuestMem, inp: &BootInputs) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(hdr) = inp.payload.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = inp.cmdline.len() as u32;
    if let Some((addr, size)) = inp.initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = inp.rsdp;
    let map = layout::e820_map(inp.ram_size);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = map.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMem>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE)),
        mem,
    )
    .map_err(|e| Error::new(Kind::Payload, format!("writing the zero page: {e}")))
}
