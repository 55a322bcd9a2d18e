//! A raw disk image file: the fd the device's io_uring reads and writes guest memory through, and
//! positional reads and writes for what is served at once (`pread`/`pwrite` on the device
//! worker's thread; with `direct`, through an aligned bounce buffer, since O_DIRECT needs aligned
//! memory and guest buffers are anywhere).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use crate::error::{Error, Kind, Result};

pub const SECTOR_SIZE: u64 = 512;
/// O_DIRECT's alignment for memory, offsets and lengths on every block device we meet.
const DIRECT_ALIGN: usize = 4096;
/// Zeros written per pwrite where the filesystem cannot zero a range itself.
const ZERO_CHUNK: usize = 1 << 20;

pub struct DiskImage {
    file: File,
    pub readonly: bool,
    direct: bool,
    /// The image's size in bytes, fixed when it was opened.
    pub size: u64,
}

impl DiskImage {
    /// Opens a regular file (or block device) for the guest.
    pub fn open(path: &str, readonly: bool, direct: bool) -> Result<DiskImage> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!readonly);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(|e| {
            Error::io(
                Kind::InvalidConfig,
                &format!("opening disk image {path}"),
                e,
            )
        })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(Kind::InvalidConfig, &format!("fstat disk image {path}"), e))?;
        let size = if meta.file_type().is_block_device() {
            // SAFETY: lseek on a file we own; it moves only this fd's offset, which we never use.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(Error::io(
                    Kind::InvalidConfig,
                    &format!("sizing disk {path}"),
                    std::io::Error::last_os_error(),
                ));
            }
            end as u64
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(Error::new(
                Kind::InvalidConfig,
                format!("disk image {path} is not a regular file or block device"),
            ));
        };
        Ok(DiskImage {
            file,
            readonly,
            direct,
            size,
        })
    }

    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Whether guest memory at `addr..addr + len` can be the buffer of I/O on this file itself
    /// (O_DIRECT needs it aligned), rather than go through a bounce buffer.
    pub fn takes_in_place(&self, addr: u64, len: u64) -> bool {
        !self.direct
            || (addr.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(SECTOR_SIZE))
    }

    /// Reads `buf.len()` bytes at `offset` into guest memory and marks them dirty.
    pub fn read_into<B: BitmapSlice>(
        &self,
        offset: u64,
        buf: &VolatileSlice<B>,
    ) -> std::io::Result<()> {
        if self.direct {
            let mut bounce = AlignedBuf::new(buf.len());
            self.pread_all(bounce.as_mut_ptr(), buf.len(), offset)?;
            buf.copy_from(bounce.as_slice(buf.len()));
            return Ok(());
        }
        let guard = buf.ptr_guard_mut();
        self.pread_all(guard.as_ptr(), buf.len(), offset)?;
        // The bytes went in behind vm-memory's back (a syscall writing through a raw pointer), so
        // the VMM-side dirty bitmap learns about them here; migration sends these pages again.
        buf.bitmap().mark_dirty(0, buf.len());
        Ok(())
    }

    /// Writes `buf.len()` bytes of guest memory at `offset`.
    pub fn write_from<B: BitmapSlice>(
        &self,
        offset: u64,
        buf: &VolatileSlice<B>,
    ) -> std::io::Result<()> {
        if self.direct {
            let mut bounce = AlignedBuf::new(buf.len());
            buf.copy_to(bounce.as_mut_slice(buf.len()));
            return self.pwrite_all(bounce.as_mut_ptr(), buf.len(), offset);
        }
        let guard = buf.ptr_guard();
        self.pwrite_all(guard.as_ptr() as *mut u8, buf.len(), offset)
    }

    /// Lets the host drop `len` bytes at `offset` (they read back as zeros afterwards).
    pub fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Makes `len` bytes at `offset` read as zeros, keeping them allocated; with a filesystem that
    /// cannot, by writing zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let zeros = AlignedBuf::new(ZERO_CHUNK);
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(ZERO_CHUNK as u64) as usize;
                    self.pwrite_all(zeros.ptr, n, offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            other => other,
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate on a file we own, with plain integer arguments.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    fn pread_all(&self, ptr: *mut u8, len: usize, offset: u64) -> std::io::Result<()> {
        let fd = self.file.as_raw_fd();
        all_at(
            len,
            offset,
            std::io::ErrorKind::UnexpectedEof,
            |done, at| {
                // SAFETY: ptr..ptr+len is memory the caller holds a guard or buffer for, writable.
                unsafe { libc::pread(fd, ptr.add(done).cast(), len - done, at) }
            },
        )
    }

    fn pwrite_all(&self, ptr: *mut u8, len: usize, offset: u64) -> std::io::Result<()> {
        let fd = self.file.as_raw_fd();
        all_at(len, offset, std::io::ErrorKind::WriteZero, |done, at| {
            // SAFETY: ptr..ptr+len is readable memory the caller holds a guard or buffer for.
            unsafe { libc::pwrite(fd, ptr.add(done).cast(), len - done, at) }
        })
    }
}

/// Calls `op(done, offset + done)` (a pread or pwrite of the bytes from `done` on) until `len`
/// bytes are done, retrying EINTR; a call that moves nothing fails with `none_moved`.
fn all_at(
    len: usize,
    offset: u64,
    none_moved: std::io::ErrorKind,
    mut op: impl FnMut(usize, i64) -> isize,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        match op(done, (offset + done as u64) as i64) {
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Err(none_moved.into()),
            n => done += n as usize,
        }
    }
    Ok(())
}

/// A heap buffer aligned for O_DIRECT, its length rounded up to the alignment.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let size = len.max(1).next_multiple_of(DIRECT_ALIGN);
        let layout = std::alloc::Layout::from_size_align(size, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    fn as_slice(&self, len: usize) -> &[u8] {
        // SAFETY: ptr points at layout.size() initialised bytes and len is at most that.
        unsafe { std::slice::from_raw_parts(self.ptr, len.min(self.layout.size())) }
    }

    fn as_mut_slice(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.layout.size())) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr came from alloc with this layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

impl AsRawFd for DiskImage {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
