//! Guest RAM: one memfd per RAM range, mapped MAP_SHARED, so that later a migration can pass the
//! fds to another process or write them to a snapshot. Exposed to Python read-only, zero-copy.
//!
//! Every write the VMM makes through vm-memory (`write_slice`, `write_obj`, the loaders) is
//! recorded in a per-region bitmap (one bit per 4 KiB page); migration's dirty log ORs it with
//! KVM's log of the guest's own writes.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, Kind, Result};
use crate::layout;

/// vm-memory's page bitmap plus a flag saying whether anything was marked since the last take:
/// the VMM rarely writes guest memory during a migration, and without the flag every dirty sync
/// would sweep (and reallocate) the whole bitmap of every region to find nothing.
#[derive(Debug, Default)]
pub struct VmmBitmap {
    pages: AtomicBitmap,
    marked: AtomicBool,
}

impl VmmBitmap {
    /// The pages marked since the last call (and clears them), or None when none were.
    pub fn take(&self) -> Option<Vec<u64>> {
        // Bits are set before the flag, so a mark that races with this call is at worst seen by
        // the next one, never lost.
        self.marked.swap(false, Ordering::Acquire).then(|| self.pages.get_and_reset())
    }

    pub fn reset(&self) {
        self.marked.store(false, Ordering::Release);
        self.pages.reset();
    }
}

impl<'a> WithBitmapSlice<'a> for VmmBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for VmmBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.pages.mark_dirty(offset, len);
        if len > 0 {
            self.marked.store(true, Ordering::Release);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.pages.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for VmmBitmap {
    fn with_len(len: usize) -> Self {
        VmmBitmap { pages: AtomicBitmap::with_len(len), marked: AtomicBool::new(false) }
    }
}

/// Guest memory with VMM-side dirty tracking.
pub type GuestMem = GuestMemoryMmap<VmmBitmap>;

pub const PAGE_SIZE: u64 = 4096;

pub struct GuestRam {
    pub mem: GuestMem,
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
        Self::with_ranges(&layout::ram_ranges(size))
    }

    /// Fresh memfd-backed RAM at the given (guest address, size) ranges (sorted, page aligned).
    pub fn with_ranges(ranges: &[(u64, u64)]) -> Result<Arc<GuestRam>> {
        let mut fds = Vec::new();
        for (i, &(start, len)) in ranges.iter().enumerate() {
            fds.push((start, memfd(&format!("vmmpy-ram{i}"), len)?, len));
        }
        Self::from_fds(fds)
    }

    /// Maps memfds received from another process (same-host migration), MAP_SHARED, at
    /// (guest address, file, size); sorted by guest address. The files stay open for `memfds()`.
    pub fn from_fds(fds: Vec<(u64, File, u64)>) -> Result<Arc<GuestRam>> {
        let mut ranges = Vec::with_capacity(fds.len());
        for (gpa, file, size) in fds {
            if size == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
                return Err(Error::new(Kind::InvalidConfig, format!("RAM region {gpa:#x}+{size:#x} is not page aligned")));
            }
            // Mapping past the end of the file would fault (SIGBUS) on first access.
            let flen = file.metadata().map_err(|e| Error::io(Kind::InvalidConfig, "fstat guest memory fd", e))?.len();
            if flen < size {
                return Err(Error::new(Kind::InvalidConfig, format!("RAM fd for {gpa:#x} holds {flen} bytes, region needs {size}")));
            }
            ranges.push((GuestAddress(gpa), size as usize, Some(FileOffset::new(file, 0))));
        }
        let mem = GuestMem::from_ranges_with_files(&ranges)
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

    /// (guest address, memfd, size) of every RAM region.
    /// The fds stay owned by `self`: dup them
    /// (or send them with SCM_RIGHTS) while `self` is alive.
    pub fn memfds(&self) -> Vec<(u64, RawFd, u64)> {
        self.mem
            .iter()
            .map(|r| {
                let fd = r.file_offset().expect("guest RAM is memfd-backed").file().as_raw_fd();
                (r.start_addr().0, fd, r.len())
            })
            .collect()
    }
}
