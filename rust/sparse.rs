//! The data extents of a sparse file (guest RAM memfds, snapshot memory files), found with
//! SEEK_DATA / SEEK_HOLE: what was never written is a hole and reads as zero, so a walk over guest
//! RAM can skip it. Private anonymous RAM has no file: its used pages are the ones
//! /proc/self/pagemap reports present or swapped out (`used_extents`).

use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;

use crate::memory::PAGE_SIZE;

/// A part of the range the file could not be asked about (an lseek failed other than with ENXIO).
/// Callers choose: count it as data (a pass that may send or zero too much) or fail (a restore
/// that would leave RAM unread).
#[derive(Debug)]
pub struct Unknown {
    /// Relative to the walk's start, like the extents.
    pub offset: u64,
    pub len: u64,
    pub error: std::io::Error,
}

impl Unknown {
    /// The unknown part, as if it were data.
    pub fn as_data(&self) -> (u64, u64) {
        (self.offset, self.len)
    }
}

/// The extents, as `(offset, len)` from `addr`, of this process's page-aligned memory
/// `addr..addr + len` whose pages are present or swapped out: private anonymous memory that was
/// never touched is neither and reads as zero. An error when pagemap cannot be read (callers
/// count everything as used).
pub fn used_extents(addr: usize, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    const PRESENT_OR_SWAPPED: u64 = 3 << 62;
    const ENTRIES: u64 = 4096; // one read covers 16 MiB of memory
    debug_assert!((addr as u64).is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE));
    let pagemap = File::open("/proc/self/pagemap")?;
    let (first, pages) = (addr as u64 / PAGE_SIZE, len / PAGE_SIZE);
    let mut buf = vec![0u8; 8 * ENTRIES as usize];
    let (mut out, mut run) = (Vec::new(), None);
    let mut p = 0;
    while p < pages {
        let n = (pages - p).min(ENTRIES);
        let bytes = &mut buf[..8 * n as usize];
        pagemap.read_exact_at(bytes, (first + p) * 8)?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let used = u64::from_ne_bytes(entry.try_into().unwrap()) & PRESENT_OR_SWAPPED != 0;
            let page = p + i as u64;
            match (used, run) {
                (true, None) => run = Some(page),
                (false, Some(start)) => {
                    out.push((start * PAGE_SIZE, (page - start) * PAGE_SIZE));
                    run = None;
                }
                _ => {}
            }
        }
        p += n;
    }
    if let Some(start) = run {
        out.push((start * PAGE_SIZE, (pages - start) * PAGE_SIZE));
    }
    Ok(out)
}

/// The data extents of `fd` in `start..start + len`, as `(offset, len)` relative to `start`, in
/// order, widened to whole pages and clipped to the range. An `Unknown` ends the walk.
pub fn data_extents(fd: RawFd, start: u64, len: u64) -> DataExtents {
    DataExtents {
        fd,
        start,
        len,
        cur: 0,
    }
}

pub struct DataExtents {
    fd: RawFd,
    start: u64,
    len: u64,
    /// Relative offset where the walk goes on; `len` once it is over.
    cur: u64,
}

impl DataExtents {
    fn seek(&self, from: u64, whence: libc::c_int) -> Option<std::io::Result<u64>> {
        // SAFETY: lseek only moves the file offset of a descriptor the caller keeps open; nothing
        // reads through that offset (every reader of these files uses pread or a mapping).
        let at = unsafe { libc::lseek(self.fd, (self.start + from) as libc::off_t, whence) };
        if at >= 0 {
            return Some(Ok((at as u64).saturating_sub(self.start)));
        }
        let e = std::io::Error::last_os_error();
        // ENXIO from SEEK_DATA: no data after `from`.
        (e.raw_os_error() != Some(libc::ENXIO)).then_some(Err(e))
    }

    fn unknown(&mut self, from: u64, error: std::io::Error) -> Result<(u64, u64), Unknown> {
        self.cur = self.len;
        Err(Unknown {
            offset: from,
            len: self.len - from,
            error,
        })
    }
}

impl Iterator for DataExtents {
    type Item = Result<(u64, u64), Unknown>;

    fn next(&mut self) -> Option<Self::Item> {
        let from = self.cur;
        if from >= self.len {
            return None;
        }
        let data = match self.seek(from, libc::SEEK_DATA) {
            None => {
                self.cur = self.len;
                return None;
            }
            Some(Err(e)) => return Some(self.unknown(from, e)),
            Some(Ok(at)) => (at & !(PAGE_SIZE - 1)).max(from),
        };
        if data >= self.len {
            self.cur = self.len;
            return None;
        }
        let hole = match self.seek(data, libc::SEEK_HOLE) {
            Some(Ok(at)) => at.next_multiple_of(PAGE_SIZE).min(self.len),
            Some(Err(e)) => return Some(self.unknown(data, e)),
            None => self.len, // ENXIO cannot come from SEEK_HOLE at a data offset
        };
        // A hole at or before the data it follows (the file changed between the seeks): the rest
        // counts as data.
        self.cur = if hole <= data { self.len } else { hole };
        Some(Ok((data, self.cur - data)))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;

    use super::*;

    const P: u64 = PAGE_SIZE;

    fn extents(fd: RawFd, start: u64, len: u64) -> Vec<(u64, u64)> {
        data_extents(fd, start, len).map(|e| e.unwrap()).collect()
    }

    #[test]
    fn extents_are_whole_pages_of_data_relative_to_start() {
        // A memfd, as guest RAM is: shmem reports holes page by page.
        // SAFETY: a NUL-terminated name; the new descriptor is owned by `file` at once.
        let fd = unsafe { libc::memfd_create(c"sparse-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is fresh and owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(64 * P).unwrap();
        assert!(extents(fd, 0, 64 * P).is_empty(), "all hole");
        file.write_all_at(&[1], 3 * P + 7).unwrap();
        file.write_all_at(&[1; 2], 10 * P - 1).unwrap(); // straddles pages 9 and 10
        file.write_all_at(&[1], 63 * P).unwrap();
        assert_eq!(
            extents(fd, 0, 64 * P),
            vec![(3 * P, P), (9 * P, 2 * P), (63 * P, P)]
        );
        // A window: offsets relative to its start, clipped to it.
        assert_eq!(extents(fd, 8 * P, 2 * P), vec![(P, P)]);
        assert_eq!(extents(fd, 10 * P, 60 * P), vec![(0, P), (53 * P, P)]);
    }

    #[test]
    fn a_descriptor_that_cannot_seek_is_unknown_from_the_start() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let got: Vec<_> = data_extents(fds[0], 0, 8 * P).collect();
        assert_eq!(got.len(), 1);
        let u = got.into_iter().next().unwrap().unwrap_err();
        assert_eq!(u.as_data(), (0, 8 * P));
        assert_eq!(u.error.raw_os_error(), Some(libc::ESPIPE));
        for fd in fds {
            // SAFETY: both ends are ours and closed once.
            unsafe { libc::close(fd) };
        }
    }
}
