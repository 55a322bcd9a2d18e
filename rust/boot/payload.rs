//! Kernel and initramfs loading. linux-loader parses and copies ELF and bzImage images; vmmpy adds
//! the checks that turn a bad file into a clear error before any vCPU runs, and reads the test
//! guest's `vmmpy` ELF note (its AP entry), which linux-loader does not know about.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Kind, Result};
use crate::layout;

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

pub struct Payload {
    pub kind: PayloadKind,
    /// 64-bit entry point of the BSP.
    pub entry: u64,
    /// Where APs start in 64-bit mode, when the payload asks for that (the `vmmpy` ELF note).
    pub ap_entry: Option<u64>,
    pub kernel_end: u64,
    /// bzImage only: the setup header to copy into the zero page.
    pub setup_header: Option<setup_header>,
    /// Longest command line the kernel accepts, including the NUL.
    pub cmdline_limit: usize,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC: u32 = 0x5372_6448; // "HdrS" at 0x202
const XLF_KERNEL_64: u16 = 1;
const PT_NOTE: u32 = 4;
const VMMPY_NOTE_AP_ENTRY: u32 = 1;
/// x86's COMMAND_LINE_SIZE for kernels that do not state theirs.
const DEFAULT_CMDLINE_LIMIT: usize = 2048;

fn payload_err(path: &str, what: impl std::fmt::Display) -> Error {
    Error::new(Kind::Payload, format!("kernel {path}: {what}"))
}

/// Loads the kernel into guest memory. `kernel` None means the embedded test guest.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: Option<&Path>) -> Result<Payload> {
    match kernel {
        None => load_elf(mem, &mut Cursor::new(TEST_GUEST), "<embedded test guest>"),
        Some(path) => {
            let name = path.display().to_string();
            let mut file = File::open(path).map_err(|e| Error::io(Kind::Payload, &format!("kernel {name}"), e))?;
            let mut head = [0u8; 0x210];
            let n = read_up_to(&mut file, &mut head).map_err(|e| Error::io(Kind::Payload, &format!("kernel {name}"), e))?;
            if n >= 4 && &head[..4] == ELF_MAGIC {
                load_elf(mem, &mut file, &name)
            } else if n >= 0x206 && u32::from_le_bytes(head[0x202..0x206].try_into().unwrap()) == BZIMAGE_MAGIC {
                load_bzimage(mem, &mut file, &name)
            } else {
                Err(payload_err(&name, "neither an ELF vmlinux nor a bzImage"))
            }
        }
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

fn load_elf<F>(mem: &GuestMemoryMmap, image: &mut F, name: &str) -> Result<Payload>
where
    F: Read + vm_memory::ReadVolatile + Seek,
{
    let ap_entry = find_ap_entry(image).map_err(|e| payload_err(name, e))?;
    let res = Elf::load(mem, None, image, Some(GuestAddress(layout::HIMEM_START)))
        .map_err(|e| payload_err(name, format!("ELF load failed: {e}")))?;
    Ok(Payload {
        kind: if ap_entry.is_some() { PayloadKind::TestGuest } else { PayloadKind::Elf },
        entry: res.kernel_load.0,
        ap_entry,
        kernel_end: res.kernel_end,
        setup_header: None,
        cmdline_limit: DEFAULT_CMDLINE_LIMIT,
    })
}

fn load_bzimage(mem: &GuestMemoryMmap, image: &mut File, name: &str) -> Result<Payload> {
    let res = BzImage::load(mem, None, image, Some(GuestAddress(layout::HIMEM_START)))
        .map_err(|e| payload_err(name, format!("bzImage load failed: {e}")))?;
    let hdr = res.setup_header.ok_or_else(|| payload_err(name, "bzImage without a setup header"))?;
    let version = hdr.version;
    if version < 0x020c {
        return Err(payload_err(name, format!("boot protocol {:#x} is older than 2.12", version)));
    }
    let xloadflags = hdr.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(payload_err(name, "bzImage has no 64-bit entry point"));
    }
    let cmdline_size = hdr.cmdline_size;
    Ok(Payload {
        kind: PayloadKind::BzImage,
        // The 64-bit entry sits 0x200 bytes into the protected-mode kernel (boot protocol).
        entry: res.kernel_load.0 + 0x200,
        ap_entry: None,
        kernel_end: res.kernel_end,
        setup_header: Some(hdr),
        cmdline_limit: cmdline_size as usize + 1,
    })
}

/// Reads the descriptor of the `vmmpy` note of type 1 (the AP entry) from the ELF's PT_NOTE segments.
fn find_ap_entry<F: Read + Seek>(image: &mut F) -> std::result::Result<Option<u64>, String> {
    let mut ehdr = [0u8; 64];
    image.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    image.read_exact(&mut ehdr).map_err(|_| "truncated ELF header".to_string())?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Err("not a little-endian ELF64 image".into());
    }
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 32), u16_at(&ehdr, 54) as u64, u16_at(&ehdr, 56) as u64);
    if phentsize < 56 || phnum > 64 {
        return Err("bad program header table".into());
    }
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        image.seek(SeekFrom::Start(phoff + i * phentsize)).map_err(|e| e.to_string())?;
        image.read_exact(&mut ph).map_err(|_| "truncated program header table".to_string())?;
        if u32_at(&ph, 0) != PT_NOTE {
            continue;
        }
        let (off, size) = (u64_at(&ph, 8), u64_at(&ph, 32));
        if size > 1 << 16 {
            return Err("oversized note segment".into());
        }
        let mut notes = vec![0u8; size as usize];
        image.seek(SeekFrom::Start(off)).map_err(|e| e.to_string())?;
        image.read_exact(&mut notes).map_err(|_| "truncated note segment".to_string())?;
        let mut pos = 0usize;
        while pos + 12 <= notes.len() {
            let (namesz, descsz, ntype) = (u32_at(&notes, pos) as usize, u32_at(&notes, pos + 4) as usize, u32_at(&notes, pos + 8));
            let name_start = pos + 12;
            let desc_start = name_start + namesz.div_ceil(4) * 4;
            let next = desc_start + descsz.div_ceil(4) * 4;
            if next > notes.len() {
                break;
            }
            if &notes[name_start..name_start + namesz] == b"vmmpy\0" && ntype == VMMPY_NOTE_AP_ENTRY && descsz == 8 {
                return Ok(Some(u64_at(&notes, desc_start)));
            }
            pos = next;
        }
    }
    Ok(None)
}

/// Places the initramfs at the top of low RAM (below the hole and the kernel's limit), page aligned.
/// Returns (address, size).
pub fn load_initramfs(mem: &GuestMemoryMmap, path: &Path, payload: &Payload, ram_size: u64) -> Result<(u64, u64)> {
    let name = path.display().to_string();
    let data = std::fs::read(path).map_err(|e| Error::io(Kind::Payload, &format!("initramfs {name}"), e))?;
    let size = data.len() as u64;
    let low_end = ram_size.min(layout::MMIO_HOLE_START);
    let max = match &payload.setup_header {
        Some(h) if h.initrd_addr_max != 0 => (h.initrd_addr_max as u64 + 1).min(low_end),
        _ => low_end,
    };
    let start = max.checked_sub(size).map(|a| a & !0xfff);
    match start {
        Some(start) if start >= payload.kernel_end.max(layout::HIMEM_START) => {
            mem.write_slice(&data, GuestAddress(start))
                .map_err(|e| Error::new(Kind::Payload, format!("initramfs {name}: {e}")))?;
            Ok((start, size))
        }
        _ => Err(Error::new(
            Kind::Payload,
            format!("initramfs {name} ({size} bytes) does not fit between the kernel (ends at {:#x}) and {max:#x}", payload.kernel_end),
        )),
    }
}
