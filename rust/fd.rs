//! Taking a duplicate of a descriptor Python hands in: vmmpy owns (and closes) its copy, the
//! caller keeps its own.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::error::{Error, Kind, Result};

/// A close-on-exec duplicate of `fd`; `what` names it in the error.
pub fn dup_owned(fd: RawFd, what: &str) -> Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor; a negative result is checked.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(Error::io(
            Kind::InvalidConfig,
            what,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}
