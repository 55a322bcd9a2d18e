//! vmmpy's native core. Python orchestrates (vmmpy/vmm.py); this crate owns the hot paths: the
//! vCPU run loop and the devices on its exit path, and guest memory.

//!
//! Python's API is the `_native` module below. The modules marked public are the migration hot
//! path's pieces, public only for benches/migration.rs (a cargo bench: a separate crate linking
//! this one's rlib); they are not an API.

mod acpi;
mod boot;
mod console;
mod cpuid;
mod devices;
#[doc(hidden)]
pub mod dirty;
mod error;
mod fd;
#[doc(hidden)]
pub mod fixtures;
mod host;
mod idle;
mod layout;
#[doc(hidden)]
pub mod memory;
mod memory_file;
mod pacer;
mod python;
#[doc(hidden)]
pub mod ranges;
mod reaper;
mod sparse;
mod spin;
mod state;
mod state_doc;
#[doc(hidden)]
pub mod tls;
#[doc(hidden)]
pub mod transfer;
mod vcpu;
mod vm;

use pyo3::prelude::*;

/// Checks that /dev/kvm opens and speaks API version 12; returns a short description.
#[pyfunction]
fn kvm_check() -> PyResult<String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| error::Error::kvm("opening /dev/kvm", e))?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(error::Error::new(
            error::Kind::Kvm,
            format!("KVM API version {version}, expected 12"),
        )
        .into());
    }
    Ok(format!(
        "KVM API {version}, max vCPUs {}",
        kvm.get_max_vcpus()
    ))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<python::PyVm>()?;
    m.add_class::<python::PyConsole>()?;
    m.add_class::<python::PyGuestRegion>()?;
    m.add_class::<python::PyRangeTable>()?;
    m.add_class::<python::PyTlsContext>()?;
    m.add_class::<python::PyTlsChannel>()?;
    m.add_class::<python::PyPacer>()?;
    m.add_class::<python::PySavedState>()?;
    m.add_function(wrap_pyfunction!(python::tune_socket, m)?)?;
    m.add_function(wrap_pyfunction!(python::await_readable, m)?)?;
    m.add_function(wrap_pyfunction!(kvm_check, m)?)?;
    m.add_function(wrap_pyfunction!(python::test_guest_elf, m)?)?;
    m.add_function(wrap_pyfunction!(python::wait_released, m)?)?;
    m.add_function(wrap_pyfunction!(python::parse_state, m)?)?;
    m.add("MAX_VCPUS", vm::MAX_VCPUS)?;
    m.add("MAX_DISKS", vm::MAX_DISKS)?;
    // The Memory frame's command number and the most RAM one frame carries: send_memory writes
    // the frame, so the Python side of the protocol takes both from here.
    m.add("CMD_MEMORY", transfer::CMD_MEMORY)?;
    m.add("CHUNK_MAX", transfer::CHUNK_MAX)?;
    Ok(())
}
