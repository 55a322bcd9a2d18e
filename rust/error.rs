//! Native errors, mapped onto `vmmpy.errors` with the errno kept.

use pyo3::prelude::*;
use pyo3::types::PyModule;

/// Which Python exception class an error becomes (a name in `vmmpy.errors`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Kvm,
    Payload,
    InvalidConfig,
    PauseTimeout,
    InvalidState,
    Migration,
    /// A host I/O failure (disk full, I/O error): the host's, not the caller's.
    HostIo,
}

impl Kind {
    fn class_name(self) -> &'static str {
        match self {
            Kind::Kvm => "KvmError",
            Kind::Payload => "PayloadError",
            Kind::InvalidConfig => "InvalidConfig",
            Kind::PauseTimeout => "PauseTimeout",
            Kind::InvalidState => "InvalidState",
            Kind::Migration => "MigrationError",
            Kind::HostIo => "VmmError",
        }
    }
}

#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
    pub errno: Option<i32>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            errno: None,
        }
    }

    /// A failed host call: `what` names it, the errno comes along.
    pub fn os(kind: Kind, what: &str, errno: i32) -> Self {
        let text = std::io::Error::from_raw_os_error(errno);
        Error {
            kind,
            message: format!("{what}: {text}"),
            errno: Some(errno),
        }
    }

    pub fn kvm(what: &str, err: vmm_sys_util::errno::Error) -> Self {
        Self::os(Kind::Kvm, what, err.errno())
    }

    pub fn io(kind: Kind, what: &str, err: std::io::Error) -> Self {
        match err.raw_os_error() {
            Some(errno) => Self::os(kind, what, errno),
            None => Self::new(kind, format!("{what}: {err}")),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        Python::attach(|py| {
            let class =
                PyModule::import(py, "vmmpy.errors").and_then(|m| m.getattr(err.kind.class_name()));
            match class {
                Ok(class) => match class.call1((err.message.clone(), err.errno)) {
                    Ok(instance) => PyErr::from_value(instance),
                    Err(e) => e,
                },
                Err(e) => e,
            }
        })
    }
}
