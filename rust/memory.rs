//! Guest RAM: by default one memfd per RAM range, mapped MAP_SHARED, so that a same-host migration
//! can pass the fds to another process; or private anonymous memory (Cloud Hypervisor's
//! `shared=off`), which faults in faster and takes transparent huge pages. Exposed to Python
//! read-only, zero-copy.
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
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::error::{Error, Kind, Result};
use crate::layout;
use crate::sparse::{self, data_extents};

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
        self.marked
            .swap(false, Ordering::Acquire)
            .then(|| self.pages.get_and_reset())
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
        VmmBitmap {
            pages: AtomicBitmap::with_len(len),
            marked: AtomicBool::new(false),
        }
    }
}

/// Guest memory with VMM-side dirty tracking.
pub type GuestMem = GuestMemoryMmap<VmmBitmap>;

/// Where a RAM region is mapped in this process.
pub fn host_address(r: &GuestRegionMmap<VmmBitmap>) -> *mut u8 {
    r.get_host_address(vm_memory::MemoryRegionAddress(0))
        .expect("guest RAM is mapped")
}

pub const PAGE_SIZE: u64 = 4096;

pub struct GuestRam {
    pub mem: GuestMem,
}

/// The seals every guest RAM memfd carries: its size is fixed, so a process it is shared with
/// (same-host migration) cannot shrink it under the other's mapping (SIGBUS) or grow it.
const RAM_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

fn memfd(name: &str, size: u64) -> Result<File> {
    let cname = CString::new(name).expect("memfd name has no NUL");
    // SAFETY: cname is a valid NUL-terminated string; the returned fd is checked before use.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(Error::io(
            Kind::Kvm,
            "memfd_create",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd was just created by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| Error::io(Kind::Kvm, "ftruncate guest memory", e))?;
    // SAFETY: fcntl on an fd we own, with an int argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, RAM_SEALS) } < 0 {
        return Err(Error::io(
            Kind::Kvm,
            "sealing guest memory",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

/// Checks a memfd another process sent: sealed against resizing, and exactly `size` bytes.
fn check_received(file: &File, gpa: u64, size: u64) -> Result<()> {
    // SAFETY: fcntl on an fd we own; F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & RAM_SEALS != RAM_SEALS {
        return Err(Error::new(
            Kind::InvalidConfig,
            format!("RAM fd for {gpa:#x} is not a memfd sealed with F_SEAL_SHRINK|F_SEAL_GROW"),
        ));
    }
    let flen = file
        .metadata()
        .map_err(|e| Error::io(Kind::InvalidConfig, "fstat guest memory fd", e))?
        .len();
    if flen != size {
        return Err(Error::new(
            Kind::InvalidConfig,
            format!("RAM fd for {gpa:#x} holds {flen} bytes, the region has {size}"),
        ));
    }
    Ok(())
}

impl GuestRam {
    /// Fresh RAM of `size` bytes: memfds when `shared`, else private anonymous memory.
    pub fn new(size: u64, shared: bool) -> Result<Arc<GuestRam>> {
        let ranges = layout::ram_ranges(size);
        if shared {
            Self::with_ranges(&ranges)
        } else {
            Self::private(&ranges)
        }
    }

    /// Fresh private anonymous RAM at the given ranges (MAP_PRIVATE | MAP_NORESERVE, as
    /// vm-memory maps it), with MADV_HUGEPAGE as Cloud Hypervisor's `thp=on`: a received or
    /// written page faults in several times faster than a memfd's here (README: full-RAM
    /// migrations). It has no fd to pass to another process, so no same-host migration.
    pub fn private(ranges: &[(u64, u64)]) -> Result<Arc<GuestRam>> {
        let ranges: Vec<_> = ranges
            .iter()
            .map(|&(gpa, len)| (GuestAddress(gpa), len as usize))
            .collect();
        let mem = GuestMem::from_ranges(&ranges)
            .map_err(|e| Error::new(Kind::Kvm, format!("mapping guest memory: {e}")))?;
        for r in mem.iter() {
            let host = host_address(r);
            // SAFETY: madvise on the region's own fresh mapping; a host without transparent huge
            // pages refuses it, which only leaves 4 KiB pages.
            unsafe { libc::madvise(host.cast(), r.len() as usize, libc::MADV_HUGEPAGE) };
        }
        Ok(Arc::new(GuestRam { mem }))
    }

    /// Fresh memfd-backed RAM at the given (guest address, size) ranges (sorted, page aligned).
    pub fn with_ranges(ranges: &[(u64, u64)]) -> Result<Arc<GuestRam>> {
        let mut fds = Vec::new();
        for (i, &(start, len)) in ranges.iter().enumerate() {
            fds.push((start, memfd(&format!("vmmpy-ram{i}"), len)?, len));
        }
        Self::map(fds, false)
    }

    /// Maps memfds received from another process (same-host migration), MAP_SHARED, at
    /// (guest address, file, size); sorted by guest address. Each must be sealed against
    /// resizing and exactly its region's size. The files stay open for `memfds()`.
    pub fn from_fds(fds: Vec<(u64, File, u64)>) -> Result<Arc<GuestRam>> {
        Self::map(fds, true)
    }

    fn map(fds: Vec<(u64, File, u64)>, received: bool) -> Result<Arc<GuestRam>> {
        let mut ranges = Vec::with_capacity(fds.len());
        for (gpa, file, size) in fds {
            if size == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
                return Err(Error::new(
                    Kind::InvalidConfig,
                    format!("RAM region {gpa:#x}+{size:#x} is not page aligned"),
                ));
            }
            // Mapping past the end of the file would fault (SIGBUS) on first access.
            if received {
                check_received(&file, gpa, size)?;
            }
            ranges.push((
                GuestAddress(gpa),
                size as usize,
                Some(FileOffset::new(file, 0)),
            ));
        }
        let mem = GuestMem::from_ranges_with_files(&ranges)
            .map_err(|e| Error::new(Kind::Kvm, format!("mapping guest memory: {e}")))?;
        Ok(Arc::new(GuestRam { mem }))
    }

    /// (guest address, host address, size) of every RAM region.
    pub fn regions(&self) -> Vec<(u64, u64, u64)> {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, host_address(r) as u64, r.len()))
            .collect()
    }

    /// The `(offset, len)` extents of region `index` that may hold data, in order: a memfd's
    /// data (SEEK_DATA), private RAM's pages present or swapped out (pagemap). What cannot be
    /// told counts as data, so a walk over these skips only memory that reads as zero.
    pub fn used_extents(&self, index: usize) -> Vec<(u64, u64)> {
        let r = self.mem.iter().nth(index).expect("a RAM region index");
        match r.file_offset() {
            Some(fo) => data_extents(fo.file().as_raw_fd(), fo.start(), r.len())
                .map(|e| e.unwrap_or_else(|unknown| unknown.as_data()))
                .collect(),
            None => sparse::used_extents(host_address(r) as usize, r.len())
                .unwrap_or_else(|_| vec![(0, r.len())]),
        }
    }

    /// (guest address, memfd, size) of every RAM region. The fds stay owned by `self`: dup them
    /// (or send them with SCM_RIGHTS) while `self` is alive. Private RAM has none: an error.
    pub fn memfds(&self) -> Result<Vec<(u64, RawFd, u64)>> {
        self.mem
            .iter()
            .map(|r| {
                let fo = r.file_offset().ok_or_else(|| {
                    Error::new(
                        Kind::InvalidConfig,
                        "guest RAM is private (memory shared=off): it has no memory fds to pass \
                         (same-host migration needs shared=on)",
                    )
                })?;
                Ok((r.start_addr().0, fo.file().as_raw_fd(), r.len()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_memfds_are_sealed_and_received_ones_checked() {
        let f = memfd("t", 1 << 20).unwrap();
        assert!(f.set_len(4096).is_err(), "a sealed memfd cannot shrink");
        check_received(&f, 0, 1 << 20).unwrap();
        assert!(check_received(&f, 0, 2 << 20)
            .unwrap_err()
            .message
            .contains("holds"));
        let cname = CString::new("unsealed").unwrap();
        // SAFETY: a valid name; the fd is owned by the File at once.
        let unsealed =
            unsafe { File::from_raw_fd(libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC)) };
        unsealed.set_len(1 << 20).unwrap();
        assert!(check_received(&unsealed, 0, 1 << 20)
            .unwrap_err()
            .message
            .contains("sealed"));
    }
}
