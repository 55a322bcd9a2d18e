//! Guest RAM: one memfd per RAM range, mapped MAP_SHARED, so that later a migration can pass the
//! fds to another process or write them to a snapshot. Exposed to Python read-only, zero-copy.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, Kind, Result};
use crate::layout;

pub struct GuestRam {
    pub mem: GuestMemoryMmap,
}

fn memfd(name: &str, size: u64) -> Result<File> {
    let cname = CString::new(name).expect("memfd name has no NUL");
    // SAFETY: cname is a valid NUL-terminated string; the returned fd is checked before use.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io(Kind::Kvm, "memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| Error::io(Kind::Kvm, "ftruncate guest memory", e))?;
    Ok(file)
}

impl GuestRam {
    pub fn new(size: u64) -> Result<Arc<GuestRam>> {
        let mut ranges = Vec::new();
        for (i, (start, len)) in layout::ram_ranges(size).into_iter().enumerate() {
            let file = memfd(&format!("vmmpy-ram{i}"), len)?;
            ranges.push((GuestAddress(start), len as usize, Some(FileOffset::new(file, 0))));
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(&ranges)
            .map_err(|e| Error::new(Kind::Kvm, format!("mapping guest memory: {e}")))?;
        Ok(Arc::new(GuestRam { mem }))
    }

    /// (guest address, host address, size) of every RAM region.
    pub fn regions(&self) -> Vec<(u64, u64, u64)> {
        self.mem
            .iter()
            .map(|r| {
                let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).expect("region mapped") as u64;
                (r.start_addr().0, host, r.len())
            })
            .collect()
    }
}
