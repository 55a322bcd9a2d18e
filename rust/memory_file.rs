//! Guest RAM to and from snapshot files, one sparse file per RAM region: all-zero pages are left
//! as holes, so an idle guest's snapshot costs little disk, and reading skips the holes.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Kind, Result};

const PAGE: usize = 4096;

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(Kind::InvalidConfig, &format!("{what} {}", path.display()), e)
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 words; align_to keeps alignment right.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes `mem` (one region's mapping) to `path`, leaving zero pages as holes.
pub fn save(mem: &[u8], path: &Path) -> Result<()> {
    let file = File::create(path).map_err(|e| io_err("creating", path, e))?;
    file.set_len(mem.len() as u64).map_err(|e| io_err("sizing", path, e))?;
    let mut run_start = None;
    for (i, page) in mem.chunks(PAGE).enumerate() {
        match (is_zero(page), run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(start)) => {
                file.write_all_at(&mem[start * PAGE..i * PAGE], (start * PAGE) as u64).map_err(|e| io_err("writing", path, e))?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        file.write_all_at(&mem[start * PAGE..], (start * PAGE) as u64).map_err(|e| io_err("writing", path, e))?;
    }
    file.sync_all().map_err(|e| io_err("syncing", path, e))
}

/// Reads `path` into `mem` (a fresh, zeroed region), visiting only the file's data extents.
pub fn load(mem: &mut [u8], path: &Path) -> Result<()> {
    let file = OpenOptions::new().read(true).open(path).map_err(|e| io_err("opening", path, e))?;
    let len = file.metadata().map_err(|e| io_err("reading", path, e))?.len();
    if len != mem.len() as u64 {
        return Err(Error::new(Kind::InvalidConfig, format!("{} holds {len} bytes; the RAM region has {}", path.display(), mem.len())));
    }
    let fd = file.as_raw_fd();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a descriptor we own; negative results are checked.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after pos
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        file.read_exact_at(&mut mem[data as usize..end as usize], data as u64).map_err(|e| io_err("reading", path, e))?;
        pos = end;
    }
    Ok(())
}
