//! The Python face of the native core: `Vm`, `Console` and `GuestRegion`. Every call that can
//! block (building a VM, pausing, joining vCPU threads) runs with the GIL released.

use std::os::raw::c_int;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::console::Console;
use crate::error::{Error, Kind};
use crate::memory::GuestRam;
use crate::vm::{LifecycleFds, Vm, VmConfig};

#[pyclass(name = "Console", module = "vmmpy._native")]
pub struct PyConsole(pub Console);

#[pymethods]
impl PyConsole {
    /// Output goes to a duplicate of `output_fd`. Without one, output is discarded, or with
    /// `keep_backlog` kept (up to 64 KiB) for the next socket client while none is connected.
    #[new]
    #[pyo3(signature = (output_fd=None, keep_backlog=false))]
    fn new(output_fd: Option<i32>, keep_backlog: bool) -> PyResult<Self> {
        Ok(PyConsole(Console::new(output_fd, keep_backlog)?))
    }

    fn add_client(&self, fd: i32) -> PyResult<()> {
        Ok(self.0.add_client(fd)?)
    }

    fn client_count(&self) -> usize {
        self.0.client_count()
    }

    fn push_input(&self, py: Python<'_>, data: &[u8]) {
        let data = data.to_vec();
        let console = self.0.clone();
        py.detach(move || console.push_input(&data));
    }

    fn close(&self) {
        self.0.close()
    }
}

/// One guest RAM region as a read-only buffer, without copying. It keeps the mapping alive.
#[pyclass(name = "GuestRegion", module = "vmmpy._native", frozen)]
pub struct PyGuestRegion {
    ram: Arc<GuestRam>,
    #[pyo3(get)]
    guest_address: u64,
    host: u64,
    #[pyo3(get)]
    size: u64,
}

#[pymethods]
impl PyGuestRegion {
    fn __len__(&self) -> usize {
        self.size as usize
    }

    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if flags & ffi::PyBUF_WRITABLE != 0 {
            return Err(PyBufferError::new_err("guest memory is exposed read-only"));
        }
        let me = slf.get();
        let _ = &me.ram;
        // SAFETY: `host..host+size` is a live mapping owned by `me.ram`, which the exporter object
        // (kept alive by the view) holds; the view is read-only.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(view, slf.as_ptr(), me.host as *mut std::ffi::c_void, me.size as ffi::Py_ssize_t, 1, flags)
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

#[pyclass(name = "Vm", module = "vmmpy._native")]
pub struct PyVm {
    vm: Mutex<Option<Vm>>,
}

fn not_running() -> PyErr {
    Error::new(Kind::InvalidState, "the VM has been stopped").into()
}

impl PyVm {
    fn with<T>(&self, f: impl FnOnce(&mut Vm) -> PyResult<T>) -> PyResult<T> {
        let mut guard = self.vm.lock().unwrap();
        match guard.as_mut() {
            Some(vm) => f(vm),
            None => Err(not_running()),
        }
    }
}

#[pymethods]
impl PyVm {
    /// Builds the VM and loads its payload; no vCPU runs until `boot()`.
    #[new]
    #[pyo3(signature = (*, memory_size, vcpus, kernel, initramfs, cmdline, console, reset_fd, guest_exit_fd, error_fd))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        memory_size: u64,
        vcpus: u8,
        kernel: Option<PathBuf>,
        initramfs: Option<PathBuf>,
        cmdline: String,
        console: &PyConsole,
        reset_fd: i32,
        guest_exit_fd: i32,
        error_fd: i32,
    ) -> PyResult<Self> {
        let cfg = VmConfig { memory_size, vcpus, kernel, initramfs, cmdline };
        let console = console.0.clone();
        let fds = LifecycleFds { reset: reset_fd, guest_exit: guest_exit_fd, error: error_fd };
        let vm = py.detach(move || Vm::new(&cfg, console, &fds))?;
        Ok(PyVm { vm: Mutex::new(Some(vm)) })
    }

    fn boot(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.with(|vm| Ok(vm.boot()?)))
    }

    #[pyo3(signature = (timeout=5.0))]
    fn pause(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        py.detach(|| self.with(|vm| Ok(vm.pause(Duration::from_secs_f64(timeout))?)))
    }

    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.with(|vm| {
            vm.resume();
            Ok(())
        }))
    }

    /// Ends the vCPU threads and releases the VM's fds and memory (a region object handed out
    /// earlier keeps its own mapping until it is released). Idempotent.
    fn stop(&self, py: Python<'_>) {
        let vm = self.vm.lock().unwrap().take();
        py.detach(move || drop(vm));
    }

    /// "reset" or "shutdown": the first lifecycle request any vCPU made, or None.
    fn lifecycle_request(&self) -> PyResult<Option<&'static str>> {
        self.with(|vm| Ok(vm.shared().first_request().map(|r| r.name())))
    }

    /// {"vcpu", "reason", "regs"} of the first unhandled exit, or None.
    fn error<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let info = self.with(|vm| Ok(vm.shared().error()))?;
        let Some((vcpu, reason, regs)) = info else { return Ok(None) };
        let d = PyDict::new(py);
        d.set_item("vcpu", vcpu)?;
        d.set_item("reason", reason)?;
        let r = PyDict::new(py);
        for (name, value) in regs {
            r.set_item(name, format!("{value:#x}"))?;
        }
        d.set_item("regs", r)?;
        Ok(Some(d))
    }

    fn vcpu_states(&self) -> PyResult<Vec<&'static str>> {
        self.with(|vm| Ok(vm.vcpu_states()))
    }

    #[getter]
    fn payload_kind(&self) -> PyResult<&'static str> {
        self.with(|vm| Ok(vm.payload_kind.name()))
    }

    #[getter]
    fn cmdline(&self) -> PyResult<String> {
        self.with(|vm| Ok(vm.cmdline.clone()))
    }

    fn memory_regions(&self) -> PyResult<Vec<PyGuestRegion>> {
        self.with(|vm| {
            Ok(vm
                .ram
                .regions()
                .into_iter()
                .map(|(gpa, host, size)| PyGuestRegion { ram: vm.ram.clone(), guest_address: gpa, host, size })
                .collect())
        })
    }
}
