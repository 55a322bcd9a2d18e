//! Guest RAM to and from snapshot files, one sparse file per RAM region: all-zero pages are left
//! as holes, so an idle guest's snapshot costs little disk, and reading skips the holes.
//!
//! The files arrive open: Python opens them inside the snapshot directory without following
//! symlinks (vmmpy/snapshot.py), so nothing here resolves a path.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Kind, Result};
use crate::sparse::data_extents;

const PAGE: usize = 4096;

/// Reading or writing an open snapshot file fails only through the host (disk full, I/O error).
fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::io(Kind::HostIo, &format!("{what} memory file"), e)
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 words; align_to keeps alignment right.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes `mem` (one region's mapping) to the empty `file`, leaving zero pages as holes. Only the
/// `used` extents (page-aligned `(offset, len)`, in order) are read: the rest reads as zero, and
/// reading it would map pages for nothing.
pub fn save(mem: &[u8], used: &[(u64, u64)], file: &File) -> Result<()> {
    file.set_len(mem.len() as u64)
        .map_err(|e| io_err("sizing", e))?;
    let write = |from: usize, to: usize| {
        file.write_all_at(&mem[from..to], from as u64)
            .map_err(|e| io_err("writing", e))
    };
    for &(off, len) in used {
        let (start, end) = (off as usize, (off + len) as usize);
        let mut run_start = None;
        for (i, page) in mem[start..end].chunks(PAGE).enumerate() {
            let at = start + i * PAGE;
            match (is_zero(page), run_start) {
                (false, None) => run_start = Some(at),
                (true, Some(from)) => {
                    write(from, at)?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(from) = run_start {
            write(from, end)?;
        }
    }
    file.sync_all().map_err(|e| io_err("syncing", e))
}

/// Reads `file` into `mem` (a fresh, zeroed region), visiting only the file's data extents.
pub fn load(mem: &mut [u8], file: &File) -> Result<()> {
    let meta = file.metadata().map_err(|e| io_err("reading", e))?;
    if !meta.is_file() {
        return Err(Error::new(
            Kind::InvalidConfig,
            "a memory file must be a regular file",
        ));
    }
    let len = meta.len();
    if len != mem.len() as u64 {
        return Err(Error::new(
            Kind::InvalidConfig,
            format!(
                "the memory file holds {len} bytes; the RAM region has {}",
                mem.len()
            ),
        ));
    }
    for extent in data_extents(file.as_raw_fd(), 0, len) {
        // RAM left partly unread must fail the restore.
        let (off, n) = extent.map_err(|unknown| io_err("seeking in", unknown.error))?;
        let (off, n) = (off as usize, n as usize);
        file.read_exact_at(&mut mem[off..off + n], off as u64)
            .map_err(|e| io_err("reading", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_bytes_and_holes() {
        let mut mem = vec![0u8; 16 * PAGE];
        mem[3 * PAGE + 5] = 9;
        mem[15 * PAGE] = 1;
        let file = tempfile_in_tmp();
        save(&mem, &[(0, mem.len() as u64)], &file).unwrap();
        let mut back = vec![0u8; 16 * PAGE];
        load(&mut back, &file).unwrap();
        assert_eq!(mem, back);
        let mut short = vec![0u8; 8 * PAGE];
        assert!(load(&mut short, &file)
            .unwrap_err()
            .message
            .contains("holds"));
    }

    /// An unnamed file in the temp directory (O_TMPFILE): nothing to clean up.
    fn tempfile_in_tmp() -> File {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(std::env::temp_dir())
            .unwrap()
    }
}
