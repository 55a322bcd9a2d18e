//! The disk's I/O engine: an io_uring (tokio-rs' `io-uring` crate) that keeps a device's requests
//! in flight together from its one worker thread, where synchronous `pread`s would reach storage
//! one at a time. Completions are announced on an eventfd the worker polls beside its kicks.
//!
//! Buffers handed to the ring are guest memory: the ring must be empty before that memory goes
//! away, so dropping an `IoRing` waits for whatever is still in flight.

use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub struct IoRing {
    ring: IoUring,
    done: EventFd,
    /// Operations pushed and not yet reaped.
    pending: usize,
}

impl IoRing {
    /// A ring for at most `entries` operations in flight.
    pub fn new(entries: u32) -> std::io::Result<IoRing> {
        let ring = IoUring::new(entries)?;
        let done = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(done.as_raw_fd())?;
        Ok(IoRing {
            ring,
            done,
            pending: 0,
        })
    }

    /// Readable once completions are waiting to be reaped.
    pub fn event(&self) -> &EventFd {
        &self.done
    }

    /// Queues a vectored read (`write` false) or write at `offset` of `fd`, tagged `tag`.
    ///
    /// # Safety
    /// `iov` and the memory its entries describe must stay valid, and not be used otherwise,
    /// until the completion tagged `tag` has been reaped.
    pub unsafe fn push_rw(
        &mut self,
        fd: RawFd,
        iov: &[libc::iovec],
        offset: u64,
        write: bool,
        tag: u64,
    ) -> std::io::Result<()> {
        let n = iov.len() as u32;
        let entry = if write {
            opcode::Writev::new(types::Fd(fd), iov.as_ptr(), n)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(types::Fd(fd), iov.as_ptr(), n)
                .offset(offset)
                .build()
        };
        self.push(entry.user_data(tag))
    }

    /// Queues an fdatasync of `fd`, tagged `tag`.
    pub fn push_fdatasync(&mut self, fd: RawFd, tag: u64) -> std::io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(tag);
        self.push(entry)
    }

    fn push(&mut self, entry: squeue::Entry) -> std::io::Result<()> {
        loop {
            // SAFETY: the entry's buffers are valid until its completion (push_rw's contract);
            // an fsync entry names only an fd.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.pending += 1;
                return Ok(());
            }
            // The submission queue is full: hand what it holds to the kernel, then retry.
            self.submit()?;
        }
    }

    /// Hands every queued operation to the kernel.
    pub fn submit(&mut self) -> std::io::Result<()> {
        loop {
            match self.ring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY: the kernel holds completions we have not reaped; reaping will make room.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                other => return other.map(|_| ()),
            }
        }
    }

    /// Appends finished operations (tag, result: bytes or -errno) to `out`; never blocks.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        let _ = self.done.read();
        let before = out.len();
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        self.pending -= out.len() - before;
    }

    /// Blocks until at least one operation finished (at once if none is in flight).
    pub fn wait(&mut self) -> std::io::Result<()> {
        if self.pending == 0 || !self.ring.completion().is_empty() {
            return Ok(());
        }
        match self.ring.submit_and_wait(1) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

impl Drop for IoRing {
    fn drop(&mut self) {
        // The kernel may still be writing into guest memory: wait for every operation.
        let mut sink = Vec::new();
        while self.pending > 0 {
            if self.submit().is_err() || self.wait().is_err() {
                break;
            }
            self.reap(&mut sink);
            sink.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_and_writes_complete_with_their_tags_and_signal_the_eventfd() {
        let path = std::env::temp_dir().join(format!("vmmpy-ioring-{}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&[7u8; 8192])
            .unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut ring = IoRing::new(8).unwrap();
        let mut buf = vec![0u8; 4096];
        let src = vec![9u8; 4096];
        let rd = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let wr = [libc::iovec {
            iov_base: src.as_ptr() as *mut _,
            iov_len: src.len(),
        }];
        // SAFETY: buf, src and the iovec arrays live until both completions are reaped below.
        unsafe {
            ring.push_rw(file.as_raw_fd(), &rd, 0, false, 1).unwrap();
            ring.push_rw(file.as_raw_fd(), &wr, 4096, true, 2).unwrap();
        }
        ring.push_fdatasync(file.as_raw_fd(), 3).unwrap();
        ring.submit().unwrap();
        let mut done = Vec::new();
        while done.len() < 3 {
            ring.wait().unwrap();
            ring.reap(&mut done);
        }
        done.sort();
        assert_eq!(done, vec![(1, 4096), (2, 4096), (3, 0)]);
        assert_eq!(ring.pending, 0);
        assert!(buf.iter().all(|&b| b == 7));
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[4096..].iter().all(|&b| b == 9));
        std::fs::remove_file(&path).unwrap();
    }
}
