//! Kernel and initramfs loading.
//!
//! linux-loader copies the images: `Elf::load` (PT_LOAD segments to their physical addresses, and
//! the PVH note) and `BzImage::load` (the setup header and the protected-mode kernel). It checks
//! little of what makes a kernel bootable in *this* VM, so vmmpy reads the headers itself first and
//! turns every problem into a `PayloadError` that names the file and the field, before anything is
//! written to guest memory and before any vCPU runs:
//!
//! * ELF: 64-bit little-endian x86-64 executable; program headers and every PT_LOAD segment inside
//!   the file (a truncated file is caught here, not as linux-loader's "Unable to read kernel
//!   image"); every segment in guest RAM and above vmmpy's boot structures below 1 MiB; the entry
//!   point inside a loaded segment. A `Xen` note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY) names the
//!   32-bit PVH entry, which must lie in a loaded segment too; an ELF with that note is entered the
//!   PVH way unless the 64-bit entry (Linux's 64-bit boot protocol at e_entry) is asked for. The
//!   test guest's `vmmpy` note (its AP entry) is read here too.
//! * bzImage: boot flag and `HdrS` magic, boot protocol >= 2.12, a 64-bit entry (XLF_KERNEL_64),
//!   `syssize` and the compressed payload inside the file, and the memory the kernel needs while it
//!   starts: the decompressor runs from `max(load address aligned up to kernel_alignment,
//!   pref_address)` (the kernel's LOAD_PHYSICAL_ADDR) for `init_size` bytes, which must be RAM.
//! * initramfs: placed at the top of RAM below the MMIO hole and below `initrd_addr_max`, page
//!   aligned, and never inside the kernel's image or its `init_size` region.

use std::io::{Cursor, Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::error::{Error, Kind, Result};
use crate::layout;
use crate::memory::GuestMem;

/// The test guest, built from guest/ by build.rs.
pub static TEST_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadKind {
    TestGuest,
    Elf,
    BzImage,
}

impl PayloadKind {
    pub fn name(self) -> &'static str {
        match self {
            PayloadKind::TestGuest => "test-guest",
            PayloadKind::Elf => "elf",
            PayloadKind::BzImage => "bzimage",
        }
    }
}

/// How the BSP enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Xen's PVH entry: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh,
    /// Linux's 64-bit boot protocol: long mode, identity-mapped, RSI = zero page.
    Linux64,
}

impl BootProtocol {
    pub fn name(self) -> &'static str {
        match self {
            BootProtocol::Pvh => "pvh",
            BootProtocol::Linux64 => "linux64",
        }
    }

    pub fn from_name(name: &str) -> Result<BootProtocol> {
        match name {
            "pvh" => Ok(BootProtocol::Pvh),
            "linux64" => Ok(BootProtocol::Linux64),
            other => Err(Error::new(
                Kind::InvalidConfig,
                format!("boot protocol {other:?}: must be \"pvh\" or \"linux64\""),
            )),
        }
    }
}

pub struct Payload {
    pub kind: PayloadKind,
    /// How the BSP enters: `Pvh` at `entry` in 32-bit mode, `Linux64` at `entry` in 64-bit mode.
    pub protocol: BootProtocol,
    /// Entry point of the BSP for `protocol`.
    pub entry: u64,
    /// Where APs start in 64-bit mode, when the payload asks for that (the `vmmpy` ELF note).
    pub ap_entry: Option<u64>,
    /// First byte of guest memory the kernel occupies (its image, or its decompression region).
    pub kernel_start: u64,
    /// End of the guest memory the kernel occupies while it starts: the end of the loaded image
    /// and, for a bzImage, of the `init_size` region it decompresses into. Nothing else may be
    /// placed below this address (from `kernel_start` on).
    pub kernel_end: u64,
    /// bzImage only: the setup header to copy into the zero page.
    pub setup_header: Option<setup_header>,
    /// Longest command line the kernel accepts, including the NUL.
    pub cmdline_limit: usize,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC: u32 = 0x5372_6448; // "HdrS" at 0x202
const BOOT_FLAG: u16 = 0xaa55; // at 0x1fe
const XLF_KERNEL_64: u16 = 1;
const LOADED_HIGH: u8 = 1;
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// The 64-bit entry sits 0x200 bytes into the protected-mode kernel (boot protocol, 64-bit).
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const VMMPY_NOTE_AP_ENTRY: u32 = 1;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// x86's COMMAND_LINE_SIZE for kernels that do not state theirs.
const DEFAULT_CMDLINE_LIMIT: usize = 2048;
const MAX_PHDRS: u16 = 64;
const MAX_NOTE_SEGMENT: u64 = 1 << 16;

fn payload_err(path: &str, what: impl std::fmt::Display) -> Error {
    Error::new(Kind::Payload, format!("kernel {path}: {what}"))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Where guest RAM below the MMIO hole ends (the kernel and the initramfs live below it).
fn low_ram_end(mem: &GuestMem) -> u64 {
    let mut end = 0u64;
    while end < layout::MMIO_HOLE_START && mem.address_in_range(GuestAddress(end)) {
        // Regions are at least 1 MiB and start on MiB boundaries; walk in MiB steps.
        end += 1 << 20;
    }
    end
}

/// Loads the kernel into guest memory. `kernel` None means the embedded test guest. The image
/// comes as bytes the VMM holds (read from the host by the VMM itself, or received from a
/// migration peer and checked), never as a path: a reboot loads the same content again.
/// `protocol` None chooses PVH for an ELF with the PVH note and the 64-bit entry otherwise.
pub fn load_kernel(
    mem: &GuestMem,
    kernel: Option<&[u8]>,
    protocol: Option<BootProtocol>,
) -> Result<Payload> {
    let (image, name) = match kernel {
        None => {
            return load_elf(
                mem,
                &mut Cursor::new(TEST_GUEST),
                TEST_GUEST.len() as u64,
                "<embedded test guest>",
                protocol,
            )
        }
        Some(image) => (image, "image"),
    };
    let size = image.len() as u64;
    let mut file = Cursor::new(image);
    if image.len() >= 4 && &image[..4] == ELF_MAGIC {
        load_elf(mem, &mut file, size, name, protocol)
    } else if image.len() >= 0x206
        && u32::from_le_bytes(image[0x202..0x206].try_into().unwrap()) == BZIMAGE_MAGIC
    {
        if protocol == Some(BootProtocol::Pvh) {
            return Err(payload_err(name, "a bzImage has no PVH entry: boot it with the linux64 protocol, or boot its vmlinux"));
        }
        load_bzimage(mem, &mut file, size, name)
    } else if image.is_empty() {
        Err(payload_err(name, "the file is empty"))
    } else {
        Err(payload_err(
            name,
            "not a kernel: neither an ELF vmlinux (\\x7fELF) nor a bzImage (\"HdrS\" at 0x202)",
        ))
    }
}

fn read_up_to(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// What vmmpy needs from an ELF kernel's headers, checked against the file and guest RAM.
struct ElfInfo {
    entry: u64,
    start: u64,
    end: u64,
    ap_entry: Option<u64>,
    pvh_entry: Option<u64>,
}

fn inspect_elf<F: Read + Seek>(
    mem: &GuestMem,
    image: &mut F,
    file_size: u64,
) -> std::result::Result<ElfInfo, String> {
    let mut ehdr = [0u8; 64];
    image.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    if file_size < 64 || image.read_exact(&mut ehdr).is_err() {
        return Err(format!("truncated ELF header ({file_size} bytes)"));
    }
    if ehdr[4] != 2 {
        return Err("a 32-bit ELF image: vmmpy boots 64-bit kernels (an x86-64 vmlinux)".into());
    }
    if ehdr[5] != 1 {
        return Err("not a little-endian ELF image".into());
    }
    let (e_type, e_machine) = (u16_at(&ehdr, 16), u16_at(&ehdr, 18));
    if e_machine != EM_X86_64 {
        return Err(format!(
            "ELF machine {e_machine} is not x86-64 ({EM_X86_64})"
        ));
    }
    if e_type != ET_EXEC {
        return Err(format!(
            "ELF type {e_type} is not an executable (ET_EXEC) linked at its load address"
        ));
    }
    let entry = u64_at(&ehdr, 24);
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 32), u16_at(&ehdr, 54), u16_at(&ehdr, 56));
    if phentsize != 56 || phnum == 0 || phnum > MAX_PHDRS {
        return Err(format!(
            "bad program header table ({phnum} entries of {phentsize} bytes)"
        ));
    }
    let table_end = phoff
        .checked_add(56 * phnum as u64)
        .ok_or("bad program header offset")?;
    if table_end > file_size {
        return Err(format!(
            "truncated: the program headers end at byte {table_end}, the file has {file_size}"
        ));
    }
    let low_end = low_ram_end(mem);
    let mut phdrs = Vec::new();
    image
        .seek(SeekFrom::Start(phoff))
        .map_err(|e| e.to_string())?;
    for _ in 0..phnum {
        let mut ph = [0u8; 56];
        image
            .read_exact(&mut ph)
            .map_err(|_| "truncated program header table".to_string())?;
        phdrs.push(ph);
    }
    let (mut start, mut end) = (u64::MAX, 0u64);
    let mut entry_loaded = false;
    let mut notes = Vec::new();
    let mut loaded = Vec::new();
    for (i, ph) in phdrs.iter().enumerate() {
        let (p_type, off, paddr, filesz, memsz) = (
            u32_at(ph, 0),
            u64_at(ph, 8),
            u64_at(ph, 24),
            u64_at(ph, 32),
            u64_at(ph, 40),
        );
        if p_type == PT_NOTE {
            notes.push((off, filesz));
            continue;
        }
        if p_type != PT_LOAD || memsz == 0 {
            continue;
        }
        let file_end = off
            .checked_add(filesz)
            .ok_or_else(|| format!("segment {i}: bad file range"))?;
        if file_end > file_size {
            return Err(format!(
                "truncated: segment {i} needs bytes up to {file_end}, the file has {file_size}"
            ));
        }
        if filesz > memsz {
            return Err(format!(
                "segment {i}: file size {filesz:#x} exceeds memory size {memsz:#x}"
            ));
        }
        let seg_end = paddr
            .checked_add(memsz)
            .ok_or_else(|| format!("segment {i}: bad address range"))?;
        if paddr < layout::HIMEM_START {
            return Err(format!(
                "segment {i} loads at {paddr:#x}, below 1 MiB where vmmpy keeps the boot structures (zero page, page tables, ACPI tables)"
            ));
        }
        if seg_end > low_end || !mem.check_range(GuestAddress(paddr), memsz as usize) {
            return Err(format!(
                "too big for RAM: segment {i} [{paddr:#x}, {seg_end:#x}) ends past guest RAM below the MMIO hole (which ends at {low_end:#x}); give the VM more memory"
            ));
        }
        start = start.min(paddr);
        end = end.max(seg_end);
        entry_loaded |= paddr <= entry && entry < seg_end;
        loaded.push((paddr, seg_end));
    }
    if end == 0 {
        return Err("no loadable (PT_LOAD) segment".into());
    }
    if !entry_loaded {
        return Err(format!(
            "the entry point {entry:#x} is not inside a loaded segment"
        ));
    }
    let mut ap_entry = None;
    let mut pvh_entry = None;
    for (off, size) in notes {
        let note_end = off.saturating_add(size);
        if size > MAX_NOTE_SEGMENT || note_end > file_size {
            continue; // not ours to judge: the kernel does not need its notes to boot
        }
        let mut buf = vec![0u8; size as usize];
        image
            .seek(SeekFrom::Start(off))
            .map_err(|e| e.to_string())?;
        image
            .read_exact(&mut buf)
            .map_err(|_| "truncated note segment".to_string())?;
        for (name, ntype, desc) in notes_in(&buf) {
            if name == b"vmmpy\0" && ntype == VMMPY_NOTE_AP_ENTRY && desc.len() == 8 {
                ap_entry = Some(u64_at(desc, 0));
            }
            // Linux emits the address as a 32-bit or a 64-bit value; it is a 32-bit entry either way.
            if name == b"Xen\0" && ntype == XEN_ELFNOTE_PHYS32_ENTRY && desc.len() >= 4 {
                pvh_entry = Some(u32_at(desc, 0) as u64);
            }
        }
    }
    if let Some(pvh) = pvh_entry {
        if !loaded.iter().any(|&(s, e)| s <= pvh && pvh < e) {
            return Err(format!(
                "the PVH entry point {pvh:#x} (Xen note type 18) is not inside a loaded segment"
            ));
        }
    }
    Ok(ElfInfo {
        entry,
        start,
        end,
        ap_entry,
        pvh_entry,
    })
}

/// The (name, type, descriptor) of each note in a PT_NOTE segment.
fn notes_in(notes: &[u8]) -> Vec<(&[u8], u32, &[u8])> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 12 <= notes.len() {
        let (namesz, descsz, ntype) = (
            u32_at(notes, pos) as usize,
            u32_at(notes, pos + 4) as usize,
            u32_at(notes, pos + 8),
        );
        let name_start = pos + 12;
        let desc_start = name_start + namesz.div_ceil(4) * 4;
        let next = desc_start + descsz.div_ceil(4) * 4;
        if next > notes.len() || next <= pos {
            break;
        }
        out.push((
            &notes[name_start..name_start + namesz],
            ntype,
            &notes[desc_start..desc_start + descsz],
        ));
        pos = next;
    }
    out
}

fn load_elf<F>(
    mem: &GuestMem,
    image: &mut F,
    file_size: u64,
    name: &str,
    protocol: Option<BootProtocol>,
) -> Result<Payload>
where
    F: Read + vm_memory::ReadVolatile + Seek,
{
    let info = inspect_elf(mem, image, file_size).map_err(|e| payload_err(name, e))?;
    let (protocol, entry) = match (protocol, info.pvh_entry) {
        (None | Some(BootProtocol::Pvh), Some(pvh)) => (BootProtocol::Pvh, pvh),
        (Some(BootProtocol::Pvh), None) => {
            return Err(payload_err(name, "no PVH entry (no Xen ELF note of type 18, XEN_ELFNOTE_PHYS32_ENTRY): boot it with the linux64 protocol"))
        }
        (None | Some(BootProtocol::Linux64), _) => (BootProtocol::Linux64, info.entry),
    };
    let res = Elf::load(mem, None, image, Some(GuestAddress(layout::HIMEM_START)))
        .map_err(|e| payload_err(name, format!("ELF load failed: {e}")))?;
    debug_assert_eq!(res.kernel_load.0, info.entry);
    Ok(Payload {
        kind: if info.ap_entry.is_some() {
            PayloadKind::TestGuest
        } else {
            PayloadKind::Elf
        },
        protocol,
        entry,
        ap_entry: info.ap_entry,
        kernel_start: info.start,
        kernel_end: info.end.max(res.kernel_end),
        setup_header: None,
        cmdline_limit: DEFAULT_CMDLINE_LIMIT,
    })
}

/// The setup header fields vmmpy checks, read straight from the file (offsets from the boot
/// protocol document, Documentation/arch/x86/boot.rst).
struct BzHeader {
    setup_sects: u8,
    boot_flag: u16,
    syssize: u32,
    version: u16,
    loadflags: u8,
    kernel_alignment: u32,
    relocatable: bool,
    xloadflags: u16,
    cmdline_size: u32,
    payload_offset: u32,
    payload_length: u32,
    pref_address: u64,
    init_size: u32,
}

fn read_bz_header(image: &mut Cursor<&[u8]>) -> std::io::Result<(BzHeader, usize)> {
    let mut h = [0u8; 0x268];
    image.seek(SeekFrom::Start(0))?;
    let n = read_up_to(image, &mut h)?;
    Ok((
        BzHeader {
            setup_sects: h[0x1f1],
            syssize: u32_at(&h, 0x1f4),
            boot_flag: u16_at(&h, 0x1fe),
            version: u16_at(&h, 0x206),
            loadflags: h[0x211],
            kernel_alignment: u32_at(&h, 0x230),
            relocatable: h[0x234] != 0,
            xloadflags: u16_at(&h, 0x236),
            cmdline_size: u32_at(&h, 0x238),
            payload_offset: u32_at(&h, 0x248),
            payload_length: u32_at(&h, 0x24c),
            pref_address: u64_at(&h, 0x258),
            init_size: u32_at(&h, 0x260),
        },
        n,
    ))
}

fn check_bzimage(
    mem: &GuestMem,
    h: &BzHeader,
    header_len: usize,
    file_size: u64,
) -> std::result::Result<(u64, u64), String> {
    if h.boot_flag != BOOT_FLAG {
        return Err(format!(
            "bad boot flag {:#06x} at 0x1fe (expected 0xaa55)",
            h.boot_flag
        ));
    }
    if h.version < MIN_BOOT_PROTOCOL {
        return Err(format!(
            "boot protocol {}.{:02} is older than 2.12 (vmmpy needs the 64-bit entry and its header fields)",
            h.version >> 8,
            h.version & 0xff
        ));
    }
    if header_len < 0x268 {
        return Err(format!(
            "truncated: the setup header needs 0x268 bytes, the file has {header_len}"
        ));
    }
    if h.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(
            "the bzImage has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)".into(),
        );
    }
    if h.loadflags & LOADED_HIGH == 0 {
        return Err("a zImage (loads below 1 MiB): vmmpy boots bzImages only".into());
    }
    if !h.kernel_alignment.is_power_of_two() {
        return Err(format!("bad kernel_alignment {:#x}", h.kernel_alignment));
    }
    let setup_sects = if h.setup_sects == 0 {
        4
    } else {
        h.setup_sects as u64
    };
    let setup_size = (setup_sects + 1) * 512;
    let pm_size = file_size.saturating_sub(setup_size);
    if pm_size == 0 {
        return Err(format!(
            "truncated: {file_size} bytes, not even the {setup_size}-byte setup code"
        ));
    }
    let sys_size = h.syssize as u64 * 16;
    if sys_size > pm_size {
        return Err(format!("truncated: the header says the protected-mode kernel is {sys_size} bytes, the file has {pm_size}"));
    }
    let payload_end = h.payload_offset as u64 + h.payload_length as u64;
    if payload_end > pm_size {
        return Err(format!("truncated: the compressed kernel ends at byte {payload_end} of the protected-mode kernel, which has {pm_size}"));
    }
    let load = layout::HIMEM_START;
    let low_end = low_ram_end(mem);
    let image_end = load + pm_size;
    if image_end > low_end {
        return Err(format!(
            "too big for RAM: the {} protected-mode kernel does not fit below {low_end:#x}",
            mib(pm_size)
        ));
    }
    // Where the decompressor runs and unpacks the kernel (arch/x86/boot/compressed/head_64.S): a
    // relocatable kernel takes its load address aligned up to kernel_alignment, but never less
    // than LOAD_PHYSICAL_ADDR, which the header states as pref_address; a fixed one runs at
    // pref_address.
    let align = h.kernel_alignment as u64;
    let run_start = if h.relocatable {
        load.div_ceil(align) * align
    } else {
        0
    }
    .max(h.pref_address);
    let run_end = run_start + h.init_size as u64;
    if run_end > low_end || !mem.check_range(GuestAddress(run_start), h.init_size as usize) {
        return Err(format!(
            "too big for RAM: the kernel needs [{run_start:#x}, {run_end:#x}) ({} from init_size) to decompress and start, and guest RAM below the MMIO hole ends at {low_end:#x}; give the VM more memory",
            mib(h.init_size as u64)
        ));
    }
    Ok((load, image_end.max(run_end)))
}

fn load_bzimage(
    mem: &GuestMem,
    image: &mut Cursor<&[u8]>,
    file_size: u64,
    name: &str,
) -> Result<Payload> {
    let (hdr, header_len) = read_bz_header(image)
        .map_err(|e| Error::io(Kind::Payload, &format!("kernel {name}"), e))?;
    let (load, kernel_end) =
        check_bzimage(mem, &hdr, header_len, file_size).map_err(|e| payload_err(name, e))?;
    let res = BzImage::load(
        mem,
        Some(GuestAddress(load)),
        image,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|e| payload_err(name, format!("bzImage load failed: {e}")))?;
    let setup = res
        .setup_header
        .ok_or_else(|| payload_err(name, "bzImage without a setup header"))?;
    Ok(Payload {
        kind: PayloadKind::BzImage,
        protocol: BootProtocol::Linux64,
        entry: res.kernel_load.0 + BZIMAGE_ENTRY_64_OFFSET,
        ap_entry: None,
        kernel_start: load,
        kernel_end: kernel_end.max(res.kernel_end),
        setup_header: Some(setup),
        cmdline_limit: hdr.cmdline_size as usize + 1,
    })
}

/// Places the initramfs at the top of low RAM (below the hole and the kernel's limit), page aligned,
/// above everything the kernel occupies. Returns (address, size).
pub fn load_initramfs(
    mem: &GuestMem,
    image: &[u8],
    payload: &Payload,
    ram_size: u64,
) -> Result<(u64, u64)> {
    let err = |what: String| Error::new(Kind::Payload, format!("initramfs: {what}"));
    let size = image.len() as u64;
    if size == 0 {
        return Err(err("the file is empty".into()));
    }
    let low_end = ram_size.min(layout::MMIO_HOLE_START).min(low_ram_end(mem));
    let max = match &payload.setup_header {
        Some(h) if h.initrd_addr_max != 0 => (h.initrd_addr_max as u64 + 1).min(low_end),
        _ => low_end,
    };
    let floor = payload.kernel_end.max(layout::HIMEM_START);
    let start = match max.checked_sub(size).map(|a| a & !0xfff) {
        Some(start) if start >= floor => start,
        _ => {
            return Err(err(format!(
                "{} does not fit: it would overlap the kernel, which occupies [{:#x}, {:#x}) while it starts, and must end below {max:#x} ({}); give the VM more memory",
                mib(size),
                payload.kernel_start,
                payload.kernel_end,
                if payload.setup_header.is_some() { "the end of low RAM or the kernel's initrd_addr_max" } else { "the end of low RAM" },
            )))
        }
    };
    mem.write_slice(image, GuestAddress(start))
        .map_err(|e| err(format!("writing it into guest memory: {e}")))?;
    Ok((start, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(mib: u64) -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).unwrap()
    }

    /// A minimal x86-64 ELF: one PT_LOAD of `filesz`/`memsz` bytes at `paddr`, entry at `entry`.
    fn elf(paddr: u64, filesz: u64, memsz: u64, entry: u64) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut b[64..];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&filesz.to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        b.resize(0x1000 + filesz as usize, 0x90);
        b
    }

    fn load(bytes: &[u8], mib_: u64) -> Result<Payload> {
        load_kernel(&mem(mib_), Some(bytes), None)
    }

    /// `elf(...)` with a second program header: a PT_NOTE segment holding a Xen PHYS32_ENTRY note.
    fn elf_with_pvh(pvh: u32) -> Vec<u8> {
        let mut img = elf(0x20_0000, 0x1000, 0x3000, 0x20_0010);
        img[56..58].copy_from_slice(&2u16.to_le_bytes());
        let off = img.len() as u64;
        for v in [4u32, 4, XEN_ELFNOTE_PHYS32_ENTRY] {
            img.extend_from_slice(&v.to_le_bytes());
        }
        img.extend_from_slice(b"Xen\0");
        img.extend_from_slice(&pvh.to_le_bytes());
        let ph = &mut img[64 + 56..64 + 112];
        ph[0..4].copy_from_slice(&PT_NOTE.to_le_bytes());
        ph[8..16].copy_from_slice(&off.to_le_bytes());
        ph[32..40].copy_from_slice(&20u64.to_le_bytes());
        img
    }

    #[test]
    fn pvh_note_chooses_the_entry() {
        let img = elf_with_pvh(0x20_0100);
        let p = load(&img, 64).unwrap();
        assert_eq!((p.protocol, p.entry), (BootProtocol::Pvh, 0x20_0100));
        let p = load_kernel(&mem(64), Some(&img), Some(BootProtocol::Linux64)).unwrap();
        assert_eq!((p.protocol, p.entry), (BootProtocol::Linux64, 0x20_0010));
        let plain = elf(0x20_0000, 0x1000, 0x3000, 0x20_0010);
        assert_eq!(load(&plain, 64).unwrap().protocol, BootProtocol::Linux64);
        assert!(
            msg(load_kernel(&mem(64), Some(&plain), Some(BootProtocol::Pvh)))
                .contains("no PVH entry")
        );
        assert!(msg(load(&elf_with_pvh(0x50_0000), 64)).contains("PVH entry point 0x500000"));
        assert!(msg(load_kernel(
            &mem(64),
            Some(&bzimage(0x200_0000, 0x10000)),
            Some(BootProtocol::Pvh)
        ))
        .contains("no PVH entry"));
    }

    #[test]
    fn test_guest_has_both_entries() {
        let p = load_kernel(&mem(64), None, None).unwrap();
        assert_eq!(
            (p.kind, p.protocol),
            (PayloadKind::TestGuest, BootProtocol::Pvh)
        );
        assert!(p.ap_entry.is_some());
        let p = load_kernel(&mem(64), None, Some(BootProtocol::Linux64)).unwrap();
        assert_eq!(p.protocol, BootProtocol::Linux64);
    }

    fn msg(r: Result<Payload>) -> String {
        match r {
            Ok(_) => panic!("loaded"),
            Err(e) => {
                assert_eq!(e.kind, Kind::Payload);
                e.message
            }
        }
    }

    #[test]
    fn elf_ok() {
        let p = load(&elf(0x20_0000, 0x1000, 0x3000, 0x20_0010), 64).unwrap();
        assert_eq!(p.kind, PayloadKind::Elf);
        assert_eq!(
            (p.entry, p.kernel_start, p.kernel_end),
            (0x20_0010, 0x20_0000, 0x20_3000)
        );
    }

    #[test]
    fn elf_errors() {
        let good = elf(0x20_0000, 0x1000, 0x3000, 0x20_0010);
        assert!(msg(load(&good[..0x800], 64)).contains("truncated"));
        assert!(msg(load(&good[..40], 64)).contains("truncated ELF header"));
        assert!(
            msg(load(&elf(0x20_0000, 0x1000, 0x1000_0000, 0x20_0010), 64))
                .contains("too big for RAM")
        );
        assert!(msg(load(&elf(0x8000, 0x1000, 0x1000, 0x8000), 64)).contains("below 1 MiB"));
        assert!(msg(load(&elf(0x20_0000, 0x1000, 0x1000, 0x10_0000), 64)).contains("entry point"));
        let mut b = good.clone();
        b[4] = 1;
        assert!(msg(load(&b, 64)).contains("32-bit"));
        let mut b = good.clone();
        b[18] = 40;
        assert!(msg(load(&b, 64)).contains("not x86-64"));
        assert!(msg(load(b"hello, world", 64)).contains("not a kernel"));
        assert!(msg(load(b"", 64)).contains("empty"));
    }

    fn bzimage(init_size: u32, pm: usize) -> Vec<u8> {
        let mut b = vec![0u8; 5 * 512 + pm];
        b[0x1f1] = 4;
        b[0x1f4..0x1f8].copy_from_slice(&((pm / 16) as u32).to_le_bytes());
        b[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        b[0x202..0x206].copy_from_slice(&BZIMAGE_MAGIC.to_le_bytes());
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x211] = LOADED_HIGH;
        b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        b[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        b[0x234] = 1;
        b[0x236..0x238].copy_from_slice(&0x7fu16.to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&0x200u32.to_le_bytes());
        b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        b
    }

    #[test]
    fn bzimage_ok_and_regions() {
        let p = load(&bzimage(0x200_0000, 0x10000), 64).unwrap();
        assert_eq!(p.kind, PayloadKind::BzImage);
        assert_eq!(p.entry, 0x10_0200);
        assert_eq!(p.cmdline_limit, 2048);
        // Decompresses at pref_address (LOAD_PHYSICAL_ADDR) for init_size bytes.
        assert_eq!((p.kernel_start, p.kernel_end), (0x10_0000, 0x300_0000));
        // initramfs above that, at the top of RAM.
        let ird = [7u8; 5000];
        let m = mem(64);
        let bz = bzimage(0x200_0000, 0x10000);
        let p = load_kernel(&m, Some(&bz), None).unwrap();
        let (addr, size) = load_initramfs(&m, &ird, &p, 64 << 20).unwrap();
        assert_eq!((addr, size), ((64 << 20) - 0x2000, 5000));
        let big = vec![1u8; 40 << 20];
        let e = load_initramfs(&m, &big, &p, 64 << 20).unwrap_err();
        assert!(e.message.contains("overlap the kernel"), "{}", e.message);
    }

    #[test]
    fn bzimage_errors() {
        assert!(msg(load(&bzimage(0x400_0000, 0x10000), 64)).contains("too big for RAM"));
        let b = bzimage(0x200_0000, 0x10000);
        assert!(msg(load(&b[..0x1000], 64)).contains("truncated"));
        let mut old = b.clone();
        old[0x206..0x208].copy_from_slice(&0x020au16.to_le_bytes());
        assert!(msg(load(&old, 64)).contains("older than 2.12"));
        let mut no64 = b.clone();
        no64[0x236] = 0;
        assert!(msg(load(&no64, 64)).contains("64-bit entry"));
        let mut flag = b.clone();
        flag[0x1fe] = 0;
        assert!(msg(load(&flag, 64)).contains("boot flag"));
    }
}
