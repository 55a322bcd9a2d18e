//! The serial console backend. It belongs to the VMM, not to one VM: it outlives guest reboots, so
//! a client on the console socket stays connected while the VM under it is rebuilt, and input typed
//! while no VM exists waits here for the next one.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, Weak};

use crate::error::Result;
use crate::fd::dup_owned;

/// Who wants to hear that input arrived: the serial device and idle vCPUs of the current VM.
pub trait InputListener: Send + Sync {
    fn input_ready(&self);
}

struct Output {
    /// Non-blocking unless it is a regular file: a stopped terminal, a full pipe or a slow socket
    /// client loses output rather than stall the vCPU that writes it.
    fd: OwnedFd,
    /// Socket clients are dropped on error; a file's or terminal's error is only reported by
    /// lost output.
    client: bool,
}

/// A descriptor for writing console output to `fd`. A regular file is written as it is (it never
/// blocks for long); anything else (a terminal, a pipe) is reopened as a new, non-blocking open
/// file, so the caller's own descriptor keeps its blocking mode.
fn open_output(fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: fstat into a zeroed stat buffer we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the result is checked.
    let regular =
        unsafe { libc::fstat(fd, &mut st) } == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG;
    if !regular {
        let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}"))
            .expect("no NUL in a path of digits");
        // SAFETY: a valid C string; the result is checked.
        let new = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
            )
        };
        if new >= 0 {
            // SAFETY: `new` is a fresh descriptor owned by nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(new) });
        }
    }
    dup_owned(fd, "console fd")
}

/// Output kept for the next socket client while none is connected, like a UART line's FIFO.
const BACKLOG_MAX: usize = 64 * 1024;
/// Input the guest has not read yet; beyond it input is dropped, as a UART overruns.
pub const INPUT_MAX: usize = 64 * 1024;

#[derive(Default)]
struct Inner {
    outputs: Mutex<Vec<Output>>,
    /// Some(..) for a socket console: what was written while no client was connected.
    backlog: Mutex<Option<VecDeque<u8>>>,
    input: Mutex<VecDeque<u8>>,
    listener: Mutex<Option<Weak<dyn InputListener>>>,
}

#[derive(Clone, Default)]
pub struct Console(Arc<Inner>);

fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice for its whole length.
        let n = unsafe { libc::write(fd, buf.as_ptr() as *const libc::c_void, buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

impl Console {
    /// Output goes to a duplicate of `fd` (a file or a terminal); None discards it, unless
    /// `keep_backlog`, which keeps it for the first socket client to come.
    pub fn new(output_fd: Option<RawFd>, keep_backlog: bool) -> Result<Console> {
        let console = Console::default();
        if keep_backlog {
            *console.0.backlog.lock().unwrap() = Some(VecDeque::new());
        }
        if let Some(fd) = output_fd {
            console.0.outputs.lock().unwrap().push(Output {
                fd: open_output(fd)?,
                client: false,
            });
        }
        Ok(console)
    }

    /// Adds a socket client; it gets all later output until it goes away.
    pub fn add_client(&self, fd: RawFd) -> Result<()> {
        let fd = dup_owned(fd, "console fd")?;
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        let mut outputs = self.0.outputs.lock().unwrap();
        if let Some(backlog) = self.0.backlog.lock().unwrap().as_mut() {
            let (a, b) = backlog.as_slices();
            // Best effort, like any client write: a full socket loses the rest.
            let _ = write_all(fd.as_raw_fd(), a).and_then(|_| write_all(fd.as_raw_fd(), b));
            backlog.clear();
        }
        outputs.push(Output { fd, client: true });
        Ok(())
    }

    pub fn client_count(&self) -> usize {
        self.0
            .outputs
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.client)
            .count()
    }

    /// Guest output. A slow output loses bytes rather than stall the vCPU; a gone socket client
    /// is dropped.
    pub fn write_output(&self, data: &[u8]) {
        let mut outputs = self.0.outputs.lock().unwrap();
        outputs.retain(|o| match write_all(o.fd.as_raw_fd(), data) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(_) => !o.client,
        });
        if outputs.is_empty() {
            if let Some(backlog) = self.0.backlog.lock().unwrap().as_mut() {
                backlog.extend(data);
                let excess = backlog.len().saturating_sub(BACKLOG_MAX);
                backlog.drain(..excess);
            }
        }
    }

    /// Queues input for the guest; returns how many bytes fit (the rest is dropped).
    pub fn push_input(&self, data: &[u8]) -> usize {
        let accepted = {
            let mut q = self.0.input.lock().unwrap();
            let n = data.len().min(INPUT_MAX.saturating_sub(q.len()));
            q.extend(&data[..n]);
            n
        };
        let listener = self
            .0
            .listener
            .lock()
            .unwrap()
            .as_ref()
            .and_then(Weak::upgrade);
        if let Some(l) = listener {
            l.input_ready();
        }
        accepted
    }

    /// Takes up to `max` bytes of pending input.
    pub fn take_input(&self, max: usize) -> Vec<u8> {
        let mut q = self.0.input.lock().unwrap();
        let n = max.min(q.len());
        q.drain(..n).collect()
    }

    pub fn attach(&self, listener: Weak<dyn InputListener>) {
        *self.0.listener.lock().unwrap() = Some(listener);
    }

    /// Detaches `listener` if it is still the one attached (a newer VM's stays).
    pub fn detach(&self, listener: &Weak<dyn InputListener>) {
        let mut current = self.0.listener.lock().unwrap();
        if current.as_ref().is_some_and(|l| Weak::ptr_eq(l, listener)) {
            *current = None;
        }
    }

    /// Closes every output; later output is discarded.
    pub fn close(&self) {
        self.0.outputs.lock().unwrap().clear();
        *self.0.listener.lock().unwrap() = None;
    }
}

/// The serial device's `Write` side.
pub struct ConsoleWriter(pub Console);

impl io::Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_output(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_bounded_like_a_uart_fifo() {
        let console = Console::new(None, false).unwrap();
        assert_eq!(
            console.push_input(&vec![b'a'; INPUT_MAX - 10]),
            INPUT_MAX - 10
        );
        assert_eq!(console.push_input(b"0123456789abcdef"), 10); // what did not fit is dropped
        assert_eq!(console.push_input(b"x"), 0);
        assert_eq!(console.take_input(4).len(), 4);
        assert_eq!(console.push_input(b"wxyz!"), 4);
        let rest = console.take_input(usize::MAX);
        assert_eq!(rest.len(), INPUT_MAX);
        assert_eq!(&rest[rest.len() - 14..], b"0123456789wxyz");
    }
}
