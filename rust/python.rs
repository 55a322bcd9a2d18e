//! The Python face of the native core: `Vm`, `Console` and `GuestRegion`. Every call that can
//! block (building a VM, pausing, joining vCPU threads) runs with the GIL released.

use std::os::raw::c_int;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::console::Console;
use crate::error::{self, Error, Kind};
use crate::fd::dup_owned;
use crate::memory::GuestRam;
use crate::memory_file;
use crate::pacer::Pacer;
use crate::ranges::RangeTable;
use crate::tls::{Role, TlsContext, TlsStream};
use crate::transfer::Link;
use crate::vm::{
    DiskSpec, LifecycleFds, LifecycleRequest, NetBacking, NetSpec, SavedState, Vm, VmConfig,
    VsockSpec,
};
use crate::{dirty, state_doc, transfer};

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

    /// Queues input for the guest (at most 64 KiB pending); returns how many bytes fit.
    fn push_input(&self, py: Python<'_>, data: &[u8]) -> usize {
        let data = data.to_vec();
        let console = self.0.clone();
        py.detach(move || console.push_input(&data))
    }

    fn close(&self) {
        self.0.close()
    }
}

/// One guest RAM region as a read-only buffer, without copying. It keeps the mapping alive.
#[pyclass(name = "GuestRegion", module = "vmmpy._native", frozen)]
pub struct PyGuestRegion {
    /// Keeps the mapping alive for as long as this object (and so any view of it) exists.
    _ram: Arc<GuestRam>,
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

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if flags & ffi::PyBUF_WRITABLE != 0 {
            return Err(PyBufferError::new_err("guest memory is exposed read-only"));
        }
        let me = slf.get();
        // SAFETY: `host..host+size` is a live mapping owned by `me._ram`, which the exporter object
        // (kept alive by the view) holds; the view is read-only.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                me.host as *mut std::ffi::c_void,
                me.size as ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// Most calls only read the VM (a migration worker sends memory while the control loop asks
/// for the VM's lifecycle request); boot and stop take it exclusively.
#[pyclass(name = "Vm", module = "vmmpy._native")]
pub struct PyVm {
    vm: RwLock<Option<Vm>>,
}

/// A set of guest-physical page ranges (dirty pages, a Memory frame's table), kept in Rust: no
/// per-page Python objects.
#[pyclass(name = "RangeTable", module = "vmmpy._native")]
pub struct PyRangeTable(pub RangeTable);

#[pymethods]
impl PyRangeTable {
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.0.total_bytes()
    }

    fn __len__(&self) -> usize {
        self.0.len()
    }

    /// Tables of at most `max_bytes` each, in address order.
    fn split(&self, max_bytes: u64) -> Vec<PyRangeTable> {
        self.0
            .split(max_bytes)
            .into_iter()
            .map(PyRangeTable)
            .collect()
    }

    /// Adds `other`'s ranges (a union).
    fn extend(&mut self, other: &PyRangeTable) {
        self.0.merge(&other.0);
    }

    /// (guest address, length) pairs, for tests and tools.
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.0.iter().map(|r| (r.gpa, r.len)).collect()
    }
}

/// A migration's mutual-TLS material, loaded once from a `tls_dir` (rust/tls.rs).
#[pyclass(name = "TlsContext", module = "vmmpy._native", frozen)]
pub struct PyTlsContext(TlsContext);

#[pymethods]
impl PyTlsContext {
    /// `role` is "client" (the migration source) or "server" (the destination).
    #[new]
    fn new(tls_dir: PathBuf, role: &str) -> PyResult<Self> {
        let role = match role {
            "client" => Role::Client,
            "server" => Role::Server,
            other => {
                return Err(Error::new(
                    Kind::InvalidConfig,
                    format!("TLS role {other:?}: expected client or server"),
                )
                .into())
            }
        };
        Ok(PyTlsContext(TlsContext::load(&tls_dir, role)?))
    }

    /// Runs the handshake on a duplicate of socket `fd` within `timeout` seconds; the channel
    /// then carries all of the connection's bytes. `server_name` (client only): the host the
    /// server's certificate must name.
    #[pyo3(signature = (fd, timeout, server_name=String::new()))]
    fn handshake(
        &self,
        py: Python<'_>,
        fd: i32,
        timeout: f64,
        server_name: String,
    ) -> PyResult<PyTlsChannel> {
        let sock = dup_owned(fd, "migration socket")?;
        let stream = py.detach(|| {
            self.0
                .handshake(sock, &server_name, Duration::from_secs_f64(timeout))
        })?;
        Ok(PyTlsChannel(Mutex::new(Some(stream))))
    }
}

/// One TLS migration connection: its own socket duplicate and the session. Control messages go
/// through `sendall` / `recv_exact`; Memory frames through `Vm.send_memory` / `receive_memory`.
#[pyclass(name = "TlsChannel", module = "vmmpy._native", frozen)]
pub struct PyTlsChannel(Mutex<Option<TlsStream>>);

// The channel's lock follows the VM lock's rule: taken with the GIL released, native errors only
// while it is held.
impl PyTlsChannel {
    fn with<T>(&self, f: impl FnOnce(&mut TlsStream) -> error::Result<T>) -> error::Result<T> {
        match self.0.lock().unwrap().as_mut() {
            Some(s) => f(s),
            None => Err(Error::new(Kind::Migration, "the TLS channel is closed")),
        }
    }
}

#[pymethods]
impl PyTlsChannel {
    fn sendall(&self, py: Python<'_>, data: &[u8]) -> error::Result<()> {
        py.detach(|| self.with(|s| s.write_all(data)))
    }

    /// Exactly `n` decrypted bytes (the caller bounds `n`), within `timeout` seconds in all if
    /// given (an error with errno ETIMEDOUT otherwise).
    #[pyo3(signature = (n, timeout=None))]
    fn recv_exact<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut buf = vec![0u8; n];
        let deadline = timeout.map(|t| {
            std::time::Instant::now() + std::time::Duration::from_secs_f64(t.clamp(0.0, 1e9))
        });
        py.detach(|| self.with(|s| s.read_exact_by(&mut buf, deadline)))?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Closes the channel's socket duplicate; idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| drop(self.0.lock().unwrap().take()));
    }
}

/// `max_bandwidth` for one migration, shared by all its connections; measures the send rate.
#[pyclass(name = "Pacer", module = "vmmpy._native", frozen)]
pub struct PyPacer(Pacer);

#[pymethods]
impl PyPacer {
    /// `max_bandwidth` in bytes/s; 0 = unlimited.
    #[new]
    fn new(max_bandwidth: u64) -> Self {
        PyPacer(Pacer::new(max_bandwidth))
    }

    #[getter]
    fn max_bandwidth(&self) -> u64 {
        self.0.limit()
    }

    /// Bytes/s sent recently.
    fn rate(&self) -> f64 {
        self.0.rate()
    }

    /// Wakes senders waiting for the cap; they and later sends fail.
    fn cancel(&self) {
        self.0.cancel()
    }
}

/// A Memory frame's link: an int socket fd (plaintext) or a TlsChannel.
fn with_link<T>(
    target: &Bound<'_, PyAny>,
    f: impl FnOnce(Link) -> error::Result<T> + Send,
) -> PyResult<T>
where
    T: Send,
{
    let py = target.py();
    if let Ok(ch) = target.cast::<PyTlsChannel>() {
        let ch = ch.get();
        return Ok(py.detach(|| ch.with(|s| f(Link::Tls(s))))?);
    }
    let fd: i32 = target.extract()?;
    Ok(py.detach(|| f(Link::Plain(fd)))?)
}

/// Polls a socket until it is readable, yielding between looks, for `spin` seconds at most
/// (GIL released); False if that passed first.
#[pyfunction]
pub fn await_readable(py: Python<'_>, fd: i32, spin: f64) -> bool {
    let spin = std::time::Duration::from_secs_f64(spin.max(0.0));
    py.detach(|| transfer::await_readable(fd, spin))
}

/// Sets a migration socket's options (buffer sizes, TCP_NODELAY) the way the transfer code wants.
#[pyfunction]
pub fn tune_socket(fd: i32) -> PyResult<()> {
    Ok(transfer::tune_socket(fd)?)
}

fn dup_file(fd: i32) -> PyResult<std::fs::File> {
    Ok(std::fs::File::from(dup_owned(fd, "memory fd")?))
}

/// A VM state parsed from a state document, checked and ready for `Vm.restore_state`.
#[pyclass(name = "SavedState", module = "vmmpy._native", frozen)]
pub struct PySavedState(SavedState);

/// Parses a whole state document: (the VM state, a JSON object of the document's other fields).
/// A malformed native section is an InvalidConfig naming it.
#[pyfunction]
pub fn parse_state<'py>(
    py: Python<'py>,
    document: &[u8],
) -> error::Result<(PySavedState, Bound<'py, PyBytes>)> {
    let (st, rest) = state_doc::decode(document)?;
    Ok((PySavedState(st), PyBytes::new(py, &rest)))
}

/// Waits until every stopped VM's KVM objects and memory are released (the reaper thread ends
/// them after `Vm.stop(release_later=True)`); False if `timeout` seconds passed first.
#[pyfunction]
pub fn wait_released(py: Python<'_>, timeout: f64) -> bool {
    let timeout = std::time::Duration::from_secs_f64(timeout.max(0.0));
    py.detach(|| crate::reaper::wait_idle(timeout))
}

/// The embedded test guest's ELF image (tests boot it as an external kernel too).
#[pyfunction]
pub fn test_guest_elf(py: Python<'_>) -> Bound<'_, PyBytes> {
    PyBytes::new(py, crate::boot::payload::TEST_GUEST)
}

fn region(vm: &Vm, index: usize) -> error::Result<(u64, u64, u64)> {
    vm.ram
        .regions()
        .get(index)
        .copied()
        .ok_or_else(|| Error::new(Kind::InvalidConfig, format!("no RAM region {index}")))
}

fn not_running() -> Error {
    Error::new(Kind::InvalidState, "the VM has been stopped")
}

// Lock order: the VM lock is only ever taken with the GIL released, or without needing the GIL
// while it is held. So the closures given to `with`/`with_mut` return native errors, turned into
// Python exceptions (which takes the GIL) only once the lock is released.
impl PyVm {
    fn with<T>(&self, f: impl FnOnce(&Vm) -> error::Result<T>) -> error::Result<T> {
        match self.vm.read().unwrap().as_ref() {
            Some(vm) => f(vm),
            None => Err(not_running()),
        }
    }

    fn with_mut<T>(&self, f: impl FnOnce(&mut Vm) -> error::Result<T>) -> error::Result<T> {
        match self.vm.write().unwrap().as_mut() {
            Some(vm) => f(vm),
            None => Err(not_running()),
        }
    }
}

#[pymethods]
impl PyVm {
    /// Builds the VM and loads its payload (kernel and initramfs as `bytes`, which are immutable
    /// while the GIL is released); no vCPU runs until `boot()`.
    #[new]
    #[pyo3(signature = (*, memory_size, vcpus, kernel, initramfs, cmdline, console, reset_fd, guest_exit_fd, error_fd, restore=false, memory_fds=None, boot_protocol=None, disks=Vec::new(), nets=Vec::new(), vsock=None, memory_shared=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        memory_size: u64,
        vcpus: u8,
        kernel: Option<&[u8]>,
        initramfs: Option<&[u8]>,
        cmdline: String,
        console: &PyConsole,
        reset_fd: i32,
        guest_exit_fd: i32,
        error_fd: i32,
        restore: bool,
        memory_fds: Option<Vec<i32>>,
        boot_protocol: Option<&str>,
        disks: Vec<(String, String, bool, bool)>,
        nets: Vec<NetArg>,
        vsock: Option<(String, u64, i32, String)>,
        memory_shared: bool,
    ) -> PyResult<Self> {
        let boot_protocol = boot_protocol
            .map(crate::boot::payload::BootProtocol::from_name)
            .transpose()?;
        // Disks as (id, path, readonly, direct), in PCI slot order.
        let disks = disks
            .into_iter()
            .map(|(id, path, readonly, direct)| DiskSpec {
                id,
                path,
                readonly,
                direct,
            })
            .collect();
        let nets = nets
            .into_iter()
            .map(net_spec)
            .collect::<error::Result<Vec<_>>>()?;
        // The vsock device as (id, cid, listening socket fd, its path): the VM takes a copy of
        // the fd, the caller closes its own.
        let vsock = vsock.map(|(id, cid, listener_fd, path)| VsockSpec {
            id,
            cid,
            listener_fd,
            path,
        });
        let cfg = VmConfig {
            memory_size,
            memory_shared,
            vcpus,
            kernel,
            initramfs,
            cmdline,
            boot_protocol,
            disks,
            nets,
            vsock,
        };
        let console = console.0.clone();
        let fds = LifecycleFds {
            reset: reset_fd,
            guest_exit: guest_exit_fd,
            error: error_fd,
        };
        // The caller keeps its fds; the VM maps duplicates it owns.
        let memory_files = memory_fds
            .map(|fds| fds.into_iter().map(dup_file).collect::<PyResult<Vec<_>>>())
            .transpose()?;
        let vm = py.detach(move || Vm::new(&cfg, console, &fds, restore, memory_files))?;
        Ok(PyVm {
            vm: RwLock::new(Some(vm)),
        })
    }

    /// Starts the vCPUs; with `paused`, they wait for resume() before running guest code.
    #[pyo3(signature = (paused=false))]
    fn boot(&self, py: Python<'_>, paused: bool) -> error::Result<()> {
        py.detach(|| self.with_mut(|vm| vm.boot(paused)))
    }

    #[pyo3(signature = (timeout=5.0))]
    fn pause(&self, py: Python<'_>, timeout: f64) -> error::Result<()> {
        py.detach(|| self.with(|vm| vm.pause(Duration::from_secs_f64(timeout))))
    }

    /// The vCPUs held before their first entry (a migration's destination) wait spinning, for
    /// a few milliseconds at most, so that `resume` lets them run without waking them.
    fn stand_by(&self, py: Python<'_>) -> error::Result<()> {
        py.detach(|| {
            self.with(|vm| {
                vm.stand_by();
                Ok(())
            })
        })
    }

    fn resume(&self, py: Python<'_>) -> error::Result<()> {
        py.detach(|| {
            self.with(|vm| {
                vm.resume();
                Ok(())
            })
        })
    }

    /// Ends the vCPU threads, closes the devices and releases the VM's KVM fds and memory (a
    /// region object handed out earlier keeps its own mapping until it is released); with
    /// `release_later` the reaper thread releases them while the caller goes on (a reboot builds
    /// the next VM meanwhile). Idempotent.
    #[pyo3(signature = (release_later = false))]
    fn stop(&self, py: Python<'_>, release_later: bool) {
        py.detach(|| {
            drop(self.vm.write().unwrap().take());
            if !release_later {
                crate::reaper::wait_idle(RELEASE_WAIT);
            }
        })
    }

    /// "reset" or "shutdown": the first lifecycle request any vCPU made, or None.
    fn lifecycle_request(&self) -> error::Result<Option<&'static str>> {
        self.with(|vm| Ok(vm.shared().first_request().map(|r| r.name())))
    }

    /// {"vcpu", "reason", "regs"} of the first unhandled exit, or None.
    fn error<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let info = self.with(|vm| Ok(vm.shared().error()))?;
        let Some(info) = info else { return Ok(None) };
        let d = PyDict::new(py);
        d.set_item("vcpu", info.vcpu)?;
        d.set_item("reason", info.reason)?;
        let r = PyDict::new(py);
        for (name, value) in info.regs {
            r.set_item(name, format!("{value:#x}"))?;
        }
        d.set_item("regs", r)?;
        Ok(Some(d))
    }

    fn vcpu_states(&self) -> error::Result<Vec<&'static str>> {
        self.with(|vm| Ok(vm.vcpu_states()))
    }

    /// "test-guest", "elf", "bzimage", or None for a restored VM.
    #[getter]
    fn payload_kind(&self) -> error::Result<Option<&'static str>> {
        self.with(|vm| Ok(vm.payload_kind.map(|k| k.name())))
    }

    /// "pvh" or "linux64": how the BSP entered; None for a restored VM.
    #[getter]
    fn boot_protocol(&self) -> error::Result<Option<&'static str>> {
        self.with(|vm| Ok(vm.boot_protocol.map(|p| p.name())))
    }

    /// Records `kind` ("reset" or "shutdown") as if a vCPU had asked for it and writes its eventfd:
    /// replaying a request carried by a migration goes the same way as the guest's own.
    fn inject_request(&self, kind: &str) -> PyResult<()> {
        let req = match kind {
            "reset" => LifecycleRequest::Reset,
            "shutdown" => LifecycleRequest::Shutdown,
            other => {
                return Err(Error::new(
                    Kind::InvalidConfig,
                    format!("unknown lifecycle request {other:?}"),
                )
                .into())
            }
        };
        Ok(self.with(|vm| {
            vm.shared().request(req);
            Ok(())
        })?)
    }

    /// Presses the ACPI power button (GED event + interrupt); works while the VM runs or is paused.
    fn power_button(&self) -> error::Result<()> {
        self.with(|vm| vm.power_button())
    }

    /// {device id: {counter: value}} for the devices that count (virtio-net).
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        // The device locks wait for a worker's batch: not with the GIL held.
        let all = py.detach(|| self.with(|vm| Ok(vm.counters())))?;
        let out = PyDict::new(py);
        for (id, counters) in all.into_iter().filter(|(_, c)| !c.is_empty()) {
            let d = PyDict::new(py);
            for (name, value) in counters {
                d.set_item(name, value)?;
            }
            out.set_item(id, d)?;
        }
        Ok(out)
    }

    /// The paused VM's state (all but memory): the native sections of a state document, as one
    /// JSON object (rust/state_doc.rs).
    fn save_state<'py>(&self, py: Python<'py>) -> error::Result<Bound<'py, PyBytes>> {
        let doc = py.detach(|| self.with(|vm| Ok(state_doc::encode(&vm.save_state()?))))?;
        Ok(PyBytes::new(py, &doc))
    }

    /// Loads a parsed state (`parse_state`) into a VM built with restore=True before any vCPU ran
    /// (not booted, or booted paused and not resumed since).
    fn restore_state(&self, py: Python<'_>, state: &PySavedState) -> error::Result<()> {
        py.detach(|| self.with(|vm| vm.restore_state(&state.0)))
    }

    #[getter]
    fn cmdline(&self) -> error::Result<String> {
        self.with(|vm| Ok(vm.cmdline.clone()))
    }

    fn start_dirty_log(&self, py: Python<'_>) -> error::Result<()> {
        py.detach(|| self.with(|vm| vm.start_dirty_log()))
    }

    /// Pages written since the last call, KVM's log OR-ed with the VMM's own writes.
    fn dirty_ranges(&self, py: Python<'_>) -> error::Result<PyRangeTable> {
        py.detach(|| self.with(|vm| Ok(PyRangeTable(vm.dirty_ranges()?))))
    }

    fn stop_dirty_log(&self, py: Python<'_>) -> error::Result<()> {
        py.detach(|| self.with(|vm| vm.stop_dirty_log()))
    }

    /// Pre-copy's first iteration: all RAM the guest ever wrote (never-touched holes skipped).
    fn all_ram_ranges(&self, py: Python<'_>) -> error::Result<PyRangeTable> {
        py.detach(|| self.with(|vm| Ok(PyRangeTable(dirty::all_ram(&vm.ram)))))
    }

    /// Writes one Memory frame for `table` to `link` (a socket fd or a TlsChannel), straight from
    /// guest memory, at most at `pacer`'s rate. Returns (page bytes sent, pages sent with bytes,
    /// zero pages).
    #[pyo3(signature = (link, table, pacer=None))]
    fn send_memory(
        &self,
        link: &Bound<'_, PyAny>,
        table: &PyRangeTable,
        pacer: Option<&PyPacer>,
    ) -> PyResult<(u64, u64, u64)> {
        let pacer = pacer.map(|p| &p.0);
        with_link(link, |link| {
            self.with(|vm| {
                let st = transfer::send_memory(link, &vm.ram, &table.0, pacer)?;
                Ok((st.bytes_sent, st.pages, st.zero_pages))
            })
        })
    }

    /// Reads a Memory frame's table (`table_len` bytes) and pages from `link` (a socket fd or a
    /// TlsChannel) into guest memory; the caller has read the frame's header. Returns (page bytes,
    /// pages, zero pages).
    fn receive_memory(&self, link: &Bound<'_, PyAny>, table_len: u64) -> PyResult<(u64, u64, u64)> {
        with_link(link, |link| {
            self.with(|vm| {
                let st = transfer::recv_memory(link, &vm.ram, table_len)?;
                Ok((st.bytes_received, st.pages, st.zero_pages))
            })
        })
    }

    /// (guest address, fd, size) of each RAM region's memfd; the fds stay owned by the VM.
    fn memory_fds(&self) -> error::Result<Vec<(u64, i32, u64)>> {
        self.with(|vm| vm.ram.memfds())
    }

    /// Writes RAM region `index` to the sparse file open as `fd` (the caller opened it safely and
    /// keeps it; the VM must be paused or not running).
    fn save_memory(&self, py: Python<'_>, index: usize, fd: i32) -> PyResult<()> {
        let file = dup_file(fd)?;
        Ok(py.detach(|| {
            self.with(|vm| {
                if vm
                    .vcpu_states()
                    .iter()
                    .any(|s| !matches!(*s, "created" | "paused" | "exited"))
                {
                    return Err(Error::new(
                        Kind::InvalidState,
                        "memory can only be saved from a paused VM",
                    ));
                }
                let (_, host, size) = region(vm, index)?;
                // SAFETY: the region is a live mapping of `size` bytes owned by the VM; the guest
                // is paused, so nothing writes it while it is read.
                let mem = unsafe { std::slice::from_raw_parts(host as *const u8, size as usize) };
                memory_file::save(mem, &vm.ram.used_extents(index), &file)
            })
        })?)
    }

    /// Fills RAM region `index` of a VM built with restore=True from the snapshot file open as `fd`
    /// (the caller opened it safely and keeps it).
    fn load_memory(&self, py: Python<'_>, index: usize, fd: i32) -> PyResult<()> {
        let file = dup_file(fd)?;
        Ok(py.detach(|| {
            self.with(|vm| {
                if vm.vcpu_states().iter().any(|s| *s != "created") {
                    return Err(Error::new(
                        Kind::InvalidState,
                        "memory can only be loaded before the VM runs",
                    ));
                }
                let (_, host, size) = region(vm, index)?;
                // SAFETY: the region is a live mapping of `size` bytes owned by the VM, and no
                // vCPU runs yet, so this is its only user.
                let mem = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, size as usize) };
                memory_file::load(mem, &file)
            })
        })?)
    }

    fn memory_regions(&self) -> error::Result<Vec<PyGuestRegion>> {
        self.with(|vm| {
            Ok(vm
                .ram
                .regions()
                .into_iter()
                .map(|(gpa, host, size)| PyGuestRegion {
                    _ram: Arc::clone(&vm.ram),
                    guest_address: gpa,
                    host,
                    size,
                })
                .collect())
        })
    }
}

/// A NIC as Python passes it: (id, tap name, tap fd, MAC, ip, netmask); exactly one of name and fd.
type NetArg = (
    String,
    Option<String>,
    Option<i32>,
    [u8; 6],
    Option<String>,
    Option<String>,
);

fn net_spec((id, tap, fd, mac, ip, mask): NetArg) -> error::Result<NetSpec> {
    let bad = |what: String| Error::new(Kind::InvalidConfig, format!("net {id}: {what}"));
    let addr = |v: Option<String>, what: &str| {
        v.map(|text| {
            text.parse::<std::net::Ipv4Addr>()
                .map_err(|_| bad(format!("{what} {text:?} is not an IPv4 address")))
        })
        .transpose()
    };
    let (ip, mask) = (addr(ip, "ip")?, addr(mask, "mask")?);
    // Without a mask, Cloud Hypervisor's default netmask.
    let backing = match (tap, fd) {
        (Some(name), None) => NetBacking::Tap {
            name,
            ip: ip.map(|ip| {
                (
                    ip,
                    mask.unwrap_or(std::net::Ipv4Addr::new(255, 255, 255, 0)),
                )
            }),
        },
        (None, Some(fd)) => NetBacking::Fd(fd),
        (Some(_), Some(_)) => return Err(bad("needs a tap name or a tap fd, not both".into())),
        (None, None) => return Err(bad("needs a tap name or a tap fd".into())),
    };
    Ok(NetSpec { id, backing, mac })
}

/// How long a stop waits for the kernel to destroy what the reaper holds (~15 ms a VM here).
const RELEASE_WAIT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nic_needs_exactly_one_of_a_tap_name_and_a_tap_fd() {
        let spec = |tap: Option<&str>, fd: Option<i32>| {
            net_spec((
                "net0".into(),
                tap.map(String::from),
                fd,
                [2, 0, 0, 0, 0, 1],
                None,
                None,
            ))
        };
        let message = |r: error::Result<NetSpec>| r.err().map(|e| e.message).unwrap_or_default();
        assert_eq!(
            message(spec(None, None)),
            "net net0: needs a tap name or a tap fd"
        );
        assert!(message(spec(Some("t"), Some(3))).ends_with("not both"));
        assert!(spec(Some("t"), None).is_ok() && spec(None, Some(3)).is_ok());
    }
}
