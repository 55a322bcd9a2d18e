//! A KVM VM: memory slots, in-kernel irqchip and PIT, devices, vCPUs, and the lifecycle eventfds
//! through which it tells the VMM's control loop what the guest asked for.

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{cpu_setup, payload, pvh, zero_page};
use crate::console::{Console, InputListener};
use crate::devices::bus::{MmioBus, PioBus};
use crate::devices::ged::{self, Ged};
use crate::devices::msi_routes::MsiRoutes;
use crate::devices::pci::{
    bar_window::PciBarWindow, config_io::PciConfigIo, ecam::PciEcam, PciRoot, SharedFunction,
};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::disk_image::DiskImage;
use crate::devices::virtio::msix::Msix;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::pci::{VirtioPci, VirtioPciState, BAR0_SIZE};
use crate::devices::virtio::tap::Tap;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::worker::Worker;
use crate::devices::virtio::VirtioDevice;
use crate::devices::{acpi_pm::AcpiPm, cmos::Cmos, i8042::I8042, serial::Serial};
use crate::dirty::{self, DirtyLog};
use crate::error::{Error, Kind, Result};
use crate::fd::dup_owned;
use crate::idle::IdleGate;
use crate::memory::GuestRam;
use crate::ranges::RangeTable;
use crate::reaper;
use crate::state::{self, Blobs, VcpuState};
use crate::vcpu::{self, SharedVcpuFd, VcpuControl};
use crate::{acpi, cpuid, host, layout};

pub const MAX_VCPUS: u8 = 8;
/// Disks per VM: each takes a PCI slot (31 after the host bridge), 32 KiB of the BAR window and
/// two GSIs; 16 keeps all of them far from their limits.
pub const MAX_DISKS: usize = 16;
/// NICs per VM, on the same budget.
pub const MAX_NETS: usize = 8;
const SERIAL_GSI: u32 = 4;
/// How long `boot` (and the first `resume` of a VM booted paused) waits for the vCPU threads to
/// be scheduled into the guest.
const VCPU_START_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleRequest {
    Reset = 1,
    Shutdown = 2,
}

impl LifecycleRequest {
    pub fn name(self) -> &'static str {
        match self {
            LifecycleRequest::Reset => "reset",
            LifecycleRequest::Shutdown => "shutdown",
        }
    }
}

/// What a VM is built from. The kernel and initramfs are content the VMM holds, not paths.
pub struct VmConfig<'a> {
    pub memory_size: u64,
    /// Memfd-backed RAM (same-host migration can pass it), else private anonymous memory.
    pub memory_shared: bool,
    pub vcpus: u8,
    pub kernel: Option<&'a [u8]>,
    pub initramfs: Option<&'a [u8]>,
    pub cmdline: String,
    /// None: PVH for an ELF with the PVH note, else the 64-bit entry.
    pub boot_protocol: Option<payload::BootProtocol>,
    pub disks: Vec<DiskSpec>,
    pub nets: Vec<NetSpec>,
    pub vsock: Option<VsockSpec>,
}

/// A virtio-blk disk: the image the operator named for it and how to open it.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub id: String,
    pub path: String,
    pub readonly: bool,
    pub direct: bool,
}

/// A virtio-net NIC: the tap the operator named for it (or handed over) and its MAC.
#[derive(Clone, Debug)]
pub struct NetSpec {
    pub id: String,
    pub backing: NetBacking,
    pub mac: [u8; 6],
}

#[derive(Clone, Debug)]
pub enum NetBacking {
    /// A tap by name; the address and netmask it gets if vmmpy creates it.
    Tap {
        name: String,
        ip: Option<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
    },
    /// An open tap descriptor (the caller keeps it; the VM takes a duplicate).
    Fd(RawFd),
}

/// The virtio-vsock device: the guest's CID and the unix socket the VMM listens on for it
/// (bound by the caller, who keeps its descriptor open during the build; the VM takes a copy).
#[derive(Clone, Debug)]
pub struct VsockSpec {
    pub id: String,
    pub cid: u64,
    pub listener_fd: RawFd,
    pub path: String,
}

/// A virtio device of the VM: its transport (shared with the PCI bus and its worker thread), its
/// eventfds and, once booted, the worker.
struct DeviceSlot {
    id: String,
    /// Its thread's name, without the slot number ("virtio-blk").
    kind: &'static str,
    dev: Arc<Mutex<VirtioPci>>,
    kicks: Vec<EventFd>,
    wake: EventFd,
    worker: Option<Worker>,
}

/// Everything but memory that a snapshot or migration carries for a paused VM.
pub struct SavedState {
    pub vcpus: Vec<VcpuState>,
    pub machine: Blobs,
    pub serial: vm_superio::serial::SerialState,
    pub cmos: (Vec<u8>, u8),
    /// Device state by device id.
    pub devices: Vec<(String, VirtioPciState)>,
}

#[derive(Clone)]
pub struct VmErrorInfo {
    pub vcpu: u8,
    pub reason: String,
    pub regs: Vec<(&'static str, u64)>,
}

/// What the vCPU threads share.
pub struct VmShared {
    pub pio: PioBus,
    pub mmio: MmioBus,
    pub gate: Arc<IdleGate>,
    reset_evt: EventFd,
    guest_exit_evt: EventFd,
    error_evt: EventFd,
    first_request: AtomicU8,
    error: Mutex<Option<VmErrorInfo>>,
    serial: Arc<Mutex<Serial>>,
    ged: Arc<Mutex<Ged>>,
}

impl VmShared {
    /// Records the VM's first lifecycle request, then writes its eventfd: whoever reads the eventfd
    /// finds the record already there.
    pub fn request(&self, req: LifecycleRequest) {
        let _ =
            self.first_request
                .compare_exchange(0, req as u8, Ordering::SeqCst, Ordering::SeqCst);
        let evt = match req {
            LifecycleRequest::Reset => &self.reset_evt,
            LifecycleRequest::Shutdown => &self.guest_exit_evt,
        };
        // An eventfd write fails only when its counter would overflow: it is then set anyway.
        let _ = evt.write(1);
    }

    pub fn first_request(&self) -> Option<LifecycleRequest> {
        match self.first_request.load(Ordering::SeqCst) {
            1 => Some(LifecycleRequest::Reset),
            2 => Some(LifecycleRequest::Shutdown),
            _ => None,
        }
    }

    pub fn record_error(&self, vcpu: u8, mut reason: String, fd: &mut VcpuFd) {
        let run = fd.get_kvm_run();
        if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
            // SAFETY: exit_reason says the `internal` member of the union is the valid one.
            let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
            reason = format!("{reason} (suberror {suberror})");
        }
        let mut regs = Vec::new();
        if let Ok(r) = fd.get_regs() {
            regs.extend([
                ("rip", r.rip),
                ("rsp", r.rsp),
                ("rflags", r.rflags),
                ("rax", r.rax),
                ("rbx", r.rbx),
                ("rcx", r.rcx),
                ("rdx", r.rdx),
                ("rsi", r.rsi),
                ("rdi", r.rdi),
            ]);
        }
        if let Ok(s) = fd.get_sregs() {
            regs.extend([
                ("cr0", s.cr0),
                ("cr3", s.cr3),
                ("cr4", s.cr4),
                ("efer", s.efer),
                ("cs", s.cs.selector as u64),
            ]);
        }
        self.record_failure(vcpu, reason, regs);
    }

    /// Records the VM's first unhandled failure and tells the control loop (error eventfd).
    pub fn record_failure(&self, vcpu: u8, reason: String, regs: Vec<(&'static str, u64)>) {
        let mut slot = self
            .error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.is_none() {
            *slot = Some(VmErrorInfo { vcpu, reason, regs });
        }
        drop(slot);
        let _ = self.error_evt.write(1);
    }

    pub fn error(&self) -> Option<VmErrorInfo> {
        self.error.lock().unwrap().clone()
    }
}

impl InputListener for VmShared {
    fn input_ready(&self) {
        self.serial.lock().unwrap().refill();
        self.gate.wake_all();
    }
}

struct VcpuSlot {
    ctl: Arc<VcpuControl>,
    fd: SharedVcpuFd,
    thread: Option<JoinHandle<()>>,
}

pub struct Vm {
    // Dropped as `Drop for Vm` says: vCPUs end and devices close first, then the vCPU fds, the VM
    // fd and the memory go to the reaper, in that order.
    vcpus: Vec<VcpuSlot>,
    devices: Vec<DeviceSlot>,
    shared: Arc<VmShared>,
    console: Console,
    /// This VM's registration with the console, to detach exactly it.
    listener: Weak<dyn InputListener>,
    cmos: Arc<Mutex<Cmos>>,
    /// Dirty logging while a migration runs.
    dirty: Mutex<Option<DirtyLog>>,
    manual_protect: bool,
    fd: ManuallyDrop<Arc<VmFd>>,
    kvm: Kvm,
    pub ram: ManuallyDrop<Arc<GuestRam>>,
    /// None for a VM restored from a snapshot or migration.
    pub payload_kind: Option<payload::PayloadKind>,
    /// How the BSP entered; None for a restored VM.
    pub boot_protocol: Option<payload::BootProtocol>,
    pub cmdline: String,
}

fn dup_eventfd(fd: RawFd) -> Result<EventFd> {
    let owned = dup_owned(fd, "lifecycle eventfd")?;
    // SAFETY: the caller passed an eventfd; `owned` is our own duplicate, handed over whole.
    Ok(unsafe { EventFd::from_raw_fd(owned.into_raw_fd()) })
}

pub struct LifecycleFds {
    pub reset: RawFd,
    pub guest_exit: RawFd,
    pub error: RawFd,
}

impl Vm {
    /// Builds a VM. With `restore`, guest memory and CPU state come from a snapshot or a migration
    /// (`restore_state`), so no payload is loaded and no boot state is written; `memory_fds` then
    /// maps RAM another VMM on this host hands over (same-host migration) instead of fresh memory.
    pub fn new(
        cfg: &VmConfig,
        console: Console,
        fds: &LifecycleFds,
        restore: bool,
        memory_fds: Option<Vec<File>>,
    ) -> Result<Vm> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(Error::new(
                Kind::InvalidConfig,
                format!("vcpus must be 1..={MAX_VCPUS}, not {}", cfg.vcpus),
            ));
        }
        if cfg.memory_size < (64 << 20) || !cfg.memory_size.is_multiple_of(1 << 20) {
            return Err(Error::new(
                Kind::InvalidConfig,
                format!(
                    "memory size {} is not a whole number of MiB >= 64 MiB",
                    cfg.memory_size
                ),
            ));
        }
        if cfg.disks.len() > MAX_DISKS {
            return Err(Error::new(
                Kind::InvalidConfig,
                format!("{} disks: at most {MAX_DISKS}", cfg.disks.len()),
            ));
        }
        // Disk images open first: a missing or unreadable one fails the build before anything runs.
        let images = cfg
            .disks
            .iter()
            .map(|d| DiskImage::open(&d.path, d.readonly, d.direct))
            .collect::<Result<Vec<_>>>()?;
        if cfg.nets.len() > MAX_NETS {
            return Err(Error::new(
                Kind::InvalidConfig,
                format!("{} NICs: at most {MAX_NETS}", cfg.nets.len()),
            ));
        }
        // So do the taps: one that cannot be opened fails here, by name.
        let taps = cfg
            .nets
            .iter()
            .map(|n| match &n.backing {
                NetBacking::Tap { name, ip } => Tap::open(name, *ip),
                NetBacking::Fd(fd) => Tap::from_fd(*fd),
            })
            .collect::<Result<Vec<_>>>()?;
        let kvm = Kvm::new().map_err(|e| Error::kvm("opening /dev/kvm", e))?;
        let fd = kvm
            .create_vm()
            .map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
        let ram = match memory_fds {
            None => GuestRam::new(cfg.memory_size, cfg.memory_shared)?,
            Some(files) => {
                let ranges = layout::ram_ranges(cfg.memory_size);
                if files.len() != ranges.len() || !restore {
                    return Err(Error::new(
                        Kind::InvalidConfig,
                        format!(
                            "{} memory fds for {} RAM regions",
                            files.len(),
                            ranges.len()
                        ),
                    ));
                }
                GuestRam::from_fds(
                    ranges
                        .iter()
                        .zip(files)
                        .map(|(&(gpa, size), f)| (gpa, f, size))
                        .collect(),
                )?
            }
        };
        // RAM's slots before anything else: on kvm_pvm a memslot change after the irqchip (or after
        // another slot) waits 4-13 ms (a grace period, no CPU), the first one before it ~0.5 ms;
        // the order is free on any KVM.
        for (slot, (gpa, host, size)) in ram.regions().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: the region maps memory owned by `ram`, which outlives the VM fd (field order).
            unsafe { fd.set_user_memory_region(region) }
                .map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }

        fd.set_tss_address(layout::KVM_TSS_ADDR)
            .map_err(|e| Error::kvm("KVM_SET_TSS_ADDR", e))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(|e| Error::kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| Error::kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| Error::kvm("KVM_CREATE_PIT2", e))?;
        // Before any slot logs dirty pages, as KVM requires.
        let manual_protect = dirty::enable_manual_protect(&fd);

        let mut vcpu_fds = Vec::new();
        for i in 0..cfg.vcpus {
            vcpu_fds.push(
                fd.create_vcpu(i as u64)
                    .map_err(|e| Error::kvm("KVM_CREATE_VCPU", e))?,
            );
        }
        let base_cpuid = host::supported_cpuid(&kvm)?;
        for (i, vcpu) in vcpu_fds.iter().enumerate() {
            vcpu.set_cpuid2(&cpuid::for_vcpu(base_cpuid, i as u8, cfg.vcpus))
                .map_err(|e| Error::kvm("KVM_SET_CPUID2", e))?;
        }
        let (payload_kind, boot_protocol, cmdline) = if restore {
            (None, None, cfg.cmdline.clone())
        } else {
            let (kind, cmdline) = load_payload(cfg, &ram, &vcpu_fds)?;
            for (i, vcpu) in vcpu_fds.iter().enumerate() {
                setup_boot_vcpu(&kvm, vcpu, i as u8, &kind)?;
            }
            (Some(kind.kind), Some(kind.protocol), cmdline)
        };

        // Devices.
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io(Kind::Kvm, "eventfd", e))?;
        fd.register_irqfd(&irq, SERIAL_GSI)
            .map_err(|e| Error::kvm("KVM_IRQFD", e))?;
        let serial = Arc::new(Mutex::new(Serial::new(irq, console.clone(), restore)));
        let mut pio = PioBus::default();
        pio.insert(0x3f8, 8, serial.clone());
        pio.insert(0x60, 5, Arc::new(Mutex::new(I8042::default())));
        let (below, above) = match layout::ram_ranges(cfg.memory_size).as_slice() {
            [(_, low)] => (*low, 0),
            [(_, low), (_, high)] => (*low, *high),
            _ => unreachable!("ram_ranges gives one or two ranges"),
        };
        let cmos = Arc::new(Mutex::new(Cmos::new(below, above)));
        pio.insert(0x70, 2, cmos.clone());
        pio.insert(0x600, 8, Arc::new(Mutex::new(AcpiPm)));
        let ged_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io(Kind::Kvm, "eventfd", e))?;
        fd.register_irqfd(&ged_irq, ged::GED_GSI)
            .map_err(|e| Error::kvm("KVM_IRQFD", e))?;
        let ged = Arc::new(Mutex::new(Ged::new(ged_irq)));
        let mut mmio = MmioBus::default();
        mmio.insert(layout::GED_MMIO_BASE, layout::GED_MMIO_SIZE, ged.clone());
        let fd = Arc::new(fd);
        let gate = Arc::new(IdleGate::default());
        let mut virtio: Vec<(String, &'static str, Box<dyn VirtioDevice>)> = Vec::new();
        for (spec, image) in cfg.disks.iter().zip(images) {
            let block = Block::new(image, &spec.id);
            virtio.push((spec.id.clone(), "virtio-blk", Box::new(block)));
        }
        for (spec, tap) in cfg.nets.iter().zip(taps) {
            virtio.push((
                spec.id.clone(),
                "virtio-net",
                Box::new(Net::new(tap, spec.mac)),
            ));
        }
        if let Some(v) = &cfg.vsock {
            let listener = dup_owned(v.listener_fd, "vsock listening socket")?;
            let vsock = Vsock::new(v.cid, v.path.clone(), listener)
                .map_err(|e| Error::io(Kind::HostIo, "vsock device", e))?;
            virtio.push((v.id.clone(), "virtio-vsock", Box::new(vsock)));
        }
        let devices = build_virtio(&fd, &ram, virtio, &gate)?;
        let functions: Vec<SharedFunction> = devices
            .iter()
            .map(|d| d.dev.clone() as SharedFunction)
            .collect();
        let root = Arc::new(PciRoot::new(functions));
        pio.insert(
            crate::devices::pci::config_io::PORT,
            crate::devices::pci::config_io::LEN,
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        );
        mmio.insert(
            layout::PCI_ECAM_BASE,
            layout::PCI_ECAM_SIZE,
            Arc::new(Mutex::new(PciEcam::new(root.clone()))),
        );
        let windows = [
            (layout::PCI_MMIO32_BASE, layout::PCI_MMIO32_SIZE),
            (
                layout::pci_mmio64_base(cfg.memory_size),
                layout::PCI_MMIO64_SIZE,
            ),
        ];
        for (base, size) in windows {
            mmio.insert(
                base,
                size,
                Arc::new(Mutex::new(PciBarWindow::new(root.clone(), base))),
            );
        }

        let shared = Arc::new(VmShared {
            pio,
            mmio,
            gate,
            reset_evt: dup_eventfd(fds.reset)?,
            guest_exit_evt: dup_eventfd(fds.guest_exit)?,
            error_evt: dup_eventfd(fds.error)?,
            first_request: AtomicU8::new(0),
            error: Mutex::new(None),
            serial,
            ged,
        });
        let listener: Arc<dyn InputListener> = shared.clone();
        let listener = Arc::downgrade(&listener);
        console.attach(listener.clone());

        let vcpus = vcpu_fds
            .into_iter()
            .enumerate()
            .map(|(i, mut vfd)| VcpuSlot {
                ctl: VcpuControl::new(i as u8, &mut vfd),
                fd: Arc::new(Mutex::new(vfd)),
                thread: None,
            })
            .collect();
        Ok(Vm {
            vcpus,
            devices,
            shared,
            console,
            listener,
            cmos,
            dirty: Mutex::new(None),
            manual_protect,
            fd: ManuallyDrop::new(fd),
            kvm,
            ram: ManuallyDrop::new(ram),
            payload_kind,
            boot_protocol,
            cmdline,
        })
    }

    /// Starts the vCPU threads; with `paused`, they stop before running any guest code (a
    /// restored VM waits for its resume).
    pub fn boot(&mut self, paused: bool) -> Result<()> {
        if self.vcpus.iter().any(|v| v.thread.is_some()) {
            return Err(Error::new(Kind::InvalidState, "the VM has already booted"));
        }
        for slot in &mut self.vcpus {
            if paused {
                slot.ctl.pause(&self.shared);
            }
            slot.thread = Some(vcpu::spawn(
                slot.fd.clone(),
                slot.ctl.clone(),
                self.shared.clone(),
            )?);
        }
        for (i, d) in self.devices.iter_mut().enumerate() {
            let kicks = d
                .kicks
                .iter()
                .map(|k| k.try_clone())
                .collect::<std::io::Result<Vec<_>>>();
            let kicks = kicks.map_err(|e| Error::io(Kind::Kvm, "dup of a kick eventfd", e))?;
            let wake = d
                .wake
                .try_clone()
                .map_err(|e| Error::io(Kind::Kvm, "dup of a wake eventfd", e))?;
            d.worker = Some(Worker::spawn(
                format!("{}{i}", d.kind),
                d.dev.clone(),
                kicks,
                wake,
                paused,
            )?);
        }
        // Input typed before boot is waiting in the console.
        self.shared.input_ready();
        if !paused {
            self.wait_entered();
        }
        Ok(())
    }

    /// Back only once the vCPUs run guest code, so that a migration's downtime (which ends when
    /// the destination answers Complete after starting them) counts their threads' start.
    /// (Bounded: a host too busy to schedule them in time gets a VM that starts a bit later.)
    fn wait_entered(&self) {
        let deadline = Instant::now() + VCPU_START_WAIT;
        for slot in self.vcpus.iter().filter(|s| s.thread.is_some()) {
            slot.ctl.wait_entered(deadline);
        }
    }

    pub fn pause(&self, timeout: Duration) -> Result<()> {
        for v in &self.vcpus {
            v.ctl.pause(&self.shared);
        }
        let deadline = Instant::now() + timeout;
        for v in &self.vcpus {
            v.ctl.wait_paused(deadline)?;
        }
        // Quiesce after the vCPUs stand still: no new request can be made, and each device's
        // thread completes the requests it took before it acknowledges.
        for w in self.devices.iter().filter_map(|d| d.worker.as_ref()) {
            w.pause(deadline)?;
        }
        // Then what the devices wrote goes to stable storage: a destination on another host
        // opens the same shared image and must read it.
        for d in &self.devices {
            d.dev
                .lock()
                .unwrap()
                .sync_backing()
                .map_err(|e| Error::io(Kind::HostIo, &format!("syncing disk {}", d.id), e))?;
        }
        Ok(())
    }

    /// The vCPUs held before their first entry wait spinning for `resume` (vcpu.rs `stand_by`).
    pub fn stand_by(&self) {
        for v in &self.vcpus {
            v.ctl.stand_by();
        }
    }

    pub fn resume(&self) {
        for w in self.devices.iter().filter_map(|d| d.worker.as_ref()) {
            w.resume();
        }
        for v in &self.vcpus {
            v.ctl.resume(&self.shared);
        }
        // A VM booted paused runs guest code for the first time now.
        self.wait_entered();
    }

    /// Ends and joins every vCPU thread. Idempotent.
    pub fn stop(&mut self) {
        for v in &self.vcpus {
            v.ctl.kill(&self.shared);
        }
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                let _ = t.join();
            }
        }
        for d in &mut self.devices {
            if let Some(mut w) = d.worker.take() {
                w.stop();
            }
        }
    }

    pub fn vcpu_states(&self) -> Vec<&'static str> {
        self.vcpus
            .iter()
            .map(|v| {
                if v.thread.is_some() {
                    v.ctl.state()
                } else {
                    "created"
                }
            })
            .collect()
    }

    pub fn start_dirty_log(&self) -> Result<()> {
        let mut dirty = self.dirty.lock().unwrap();
        if dirty.is_some() {
            return Err(Error::new(
                Kind::InvalidState,
                "dirty logging is on already",
            ));
        }
        *dirty = Some(DirtyLog::start(&self.fd, &self.ram, self.manual_protect)?);
        Ok(())
    }

    /// Pages written since the last call (or since logging started).
    pub fn dirty_ranges(&self) -> Result<RangeTable> {
        match self.dirty.lock().unwrap().as_mut() {
            Some(log) => log.sync(&self.fd, &self.ram),
            None => Err(Error::new(Kind::InvalidState, "dirty logging is off")),
        }
    }

    pub fn stop_dirty_log(&self) -> Result<()> {
        match self.dirty.lock().unwrap().take() {
            Some(log) => log.stop(&self.fd, &self.ram),
            None => Ok(()),
        }
    }

    /// The state of a paused (or never started) VM.
    pub fn save_state(&self) -> Result<SavedState> {
        if self
            .vcpus
            .iter()
            .any(|v| v.thread.is_some() && !matches!(v.ctl.state(), "paused" | "exited"))
        {
            return Err(Error::new(
                Kind::InvalidState,
                "the VM must be paused to save its state",
            ));
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| state::save_vcpu(&self.kvm, &v.fd.lock().unwrap()))
            .collect::<Result<Vec<_>>>()?;
        Ok(SavedState {
            vcpus,
            machine: state::save_machine(&self.fd)?,
            serial: self.shared.serial.lock().unwrap().state(),
            cmos: self.cmos.lock().unwrap().state(),
            devices: self
                .devices
                .iter()
                .map(|d| (d.id.clone(), d.dev.lock().unwrap().save()))
                .collect(),
        })
    }

    /// Loads saved state into a VM built with `restore`, before any vCPU ran: before it boots,
    /// or booted paused (its vCPU threads wait, ready, during a migration's pre-copy).
    pub fn restore_state(&self, st: &SavedState) -> Result<()> {
        if self
            .vcpus
            .iter()
            .any(|v| v.thread.is_some() && !v.ctl.held_before_first_entry())
        {
            return Err(Error::new(
                Kind::InvalidState,
                "state can only be restored before any vCPU ran",
            ));
        }
        if st.vcpus.len() != self.vcpus.len() {
            return Err(Error::new(
                Kind::InvalidConfig,
                format!(
                    "state has {} vCPUs, the VM {}",
                    st.vcpus.len(),
                    self.vcpus.len()
                ),
            ));
        }
        state::restore_machine(&self.fd, &st.machine)?;
        for (slot, vst) in self.vcpus.iter().zip(&st.vcpus) {
            state::restore_vcpu(&slot.fd.lock().unwrap(), vst)?;
        }
        self.shared
            .serial
            .lock()
            .unwrap()
            .restore(&st.serial)
            .map_err(|e| Error::io(Kind::InvalidConfig, "serial state", e))?;
        self.cmos
            .lock()
            .unwrap()
            .restore(&st.cmos.0, st.cmos.1)
            .map_err(|e| Error::new(Kind::InvalidConfig, e))?;
        self.restore_devices(&st.devices)
    }

    /// Device state by id: every saved device must exist here and every device here must have
    /// saved state, or the VM would run with a device the guest's driver does not know.
    fn restore_devices(&self, saved: &[(String, VirtioPciState)]) -> Result<()> {
        for (id, _) in saved {
            if !self.devices.iter().any(|d| &d.id == id) {
                return Err(Error::new(
                    Kind::InvalidConfig,
                    format!("state has device {id}, which this VM does not have"),
                ));
            }
        }
        for d in &self.devices {
            let Some((_, st)) = saved.iter().find(|(id, _)| id == &d.id) else {
                return Err(Error::new(
                    Kind::InvalidConfig,
                    format!("state has nothing for device {}", d.id),
                ));
            };
            d.dev
                .lock()
                .unwrap()
                .restore(st)
                .map_err(|e| Error::new(Kind::InvalidConfig, format!("device {}: {e}", d.id)))?;
        }
        // The VM now runs in this VMM: NICs announce it (the guest sends gratuitous ARPs), vsock
        // resets the guest's connections (their host side stayed behind). After the vCPUs' LAPIC
        // state, so the config interrupt lands in the restored LAPIC.
        for d in &self.devices {
            d.dev.lock().unwrap().moved();
        }
        Ok(())
    }

    /// Named counters by device id (virtio-net's frames and bytes), as CH's `vm.counters`.
    pub fn counters(&self) -> Vec<(String, Vec<(&'static str, u64)>)> {
        self.devices
            .iter()
            .map(|d| (d.id.clone(), d.dev.lock().unwrap().counters()))
            .collect()
    }

    /// Presses the ACPI power button: latches the GED's event bit and raises its interrupt (a
    /// paused guest takes it when it runs again). Sleeping vCPUs are woken, as the test guest
    /// polls the register from its idle loop instead of taking the interrupt.
    pub fn power_button(&self) -> Result<()> {
        self.shared
            .ged
            .lock()
            .unwrap()
            .notify(ged::POWER_BUTTON)
            .map_err(|e| Error::io(Kind::Kvm, "raising the GED interrupt", e))?;
        self.shared.gate.wake_all();
        Ok(())
    }

    pub fn shared(&self) -> &VmShared {
        &self.shared
    }
}

/// The virtio devices (id, kind, device), in PCI slot order (00:01.0 on): BAR0 from the 32-bit
/// window, a kick eventfd per queue registered as an ioeventfd on its notify register, an irqfd
/// per MSI-X vector on its own GSI, and the idle gate woken by each interrupt.
fn build_virtio(
    fd: &Arc<VmFd>,
    ram: &Arc<GuestRam>,
    virtio: Vec<(String, &'static str, Box<dyn VirtioDevice>)>,
    gate: &Arc<IdleGate>,
) -> Result<Vec<DeviceSlot>> {
    use vm_allocator::{AddressAllocator, AllocPolicy};
    let mut bars = AddressAllocator::new(layout::PCI_MMIO32_BASE, layout::PCI_MMIO32_SIZE)
        .map_err(|e| Error::new(Kind::Kvm, format!("PCI window: {e}")))?;
    let routes = Arc::new(MsiRoutes::new(fd.clone()));
    let mut next_gsi = layout::MSI_GSI_BASE;
    let mut out = Vec::new();
    for (id, kind, device) in virtio {
        let bar0 = bars
            .allocate(BAR0_SIZE, BAR0_SIZE, AllocPolicy::FirstMatch)
            .map_err(|e| {
                Error::new(
                    Kind::InvalidConfig,
                    format!("no room for device {id}'s BAR: {e}"),
                )
            })?
            .start();
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io(Kind::Kvm, "eventfd", e));
        let queues = device.queue_max_sizes().len();
        let mut kicks = Vec::new();
        for q in 0..queues {
            let kick = eventfd()?;
            let addr = IoEventAddress::Mmio(VirtioPci::notify_address(bar0, q));
            fd.register_ioevent(&kick, &addr, NoDatamatch)
                .map_err(|e| Error::kvm("KVM_IOEVENTFD", e))?;
            kicks.push(kick);
        }
        let mut irqfds = Vec::new();
        let gsi_base = next_gsi;
        for _ in 0..queues + 1 {
            let irq = eventfd()?;
            fd.register_irqfd(&irq, next_gsi)
                .map_err(|e| Error::kvm("KVM_IRQFD", e))?;
            irqfds.push(irq);
            next_gsi += 1;
        }
        let msix = Msix::new(irqfds, Some(routes.clone()), gsi_base);
        let wake = eventfd()?;
        let own = |e: &EventFd| {
            e.try_clone()
                .map_err(|e| Error::io(Kind::Kvm, "dup of a device eventfd", e))
        };
        let dev_kicks = kicks.iter().map(own).collect::<Result<Vec<_>>>()?;
        let mut dev = VirtioPci::new(device, bar0, msix, dev_kicks, own(&wake)?, ram.clone());
        let gate = gate.clone();
        dev.set_waker(Arc::new(move || gate.wake_all()));
        out.push(DeviceSlot {
            id,
            kind,
            dev: Arc::new(Mutex::new(dev)),
            kicks,
            wake,
            worker: None,
        });
    }
    Ok(out)
}

/// Loads kernel, initramfs, command line, ACPI tables, zero page and boot page tables.
fn load_payload(
    cfg: &VmConfig,
    ram: &GuestRam,
    vcpu_fds: &[VcpuFd],
) -> Result<(payload::Payload, String)> {
    let payload = payload::load_kernel(&ram.mem, cfg.kernel, cfg.boot_protocol)?;
    let initramfs = match cfg.initramfs {
        Some(image) => Some(payload::load_initramfs(
            &ram.mem,
            image,
            &payload,
            cfg.memory_size,
        )?),
        None => None,
    };
    let mut cmdline = cfg.cmdline.clone();
    if payload.ap_entry.is_some() {
        let tsc_khz = vcpu_fds[0].get_tsc_khz().unwrap_or(0);
        cmdline.push_str(&format!(
            " vmmpy.cpus={} vmmpy.tsc_khz={}",
            cfg.vcpus, tsc_khz
        ));
    }
    let rsdp = acpi::create_acpi_tables(&ram.mem, cfg.vcpus, cfg.memory_size)
        .map_err(|e| Error::new(Kind::Kvm, format!("writing ACPI tables: {e}")))?;
    let inputs = zero_page::BootInputs {
        payload: &payload,
        cmdline: &cmdline,
        ram_size: cfg.memory_size,
        initramfs,
        rsdp: rsdp.0,
    };
    zero_page::write_cmdline(&ram.mem, &inputs)?;
    match payload.protocol {
        payload::BootProtocol::Pvh => {
            pvh::write_start_info(&ram.mem, cfg.memory_size, initramfs, rsdp.0)?
        }
        payload::BootProtocol::Linux64 => zero_page::write_zero_page(&ram.mem, &inputs)?,
    }
    // The test guest's APs start in 64-bit mode on these tables whichever way the BSP enters.
    cpu_setup::write_boot_tables(&ram.mem)?;
    Ok((payload, cmdline))
}

/// Boot state of one vCPU: the BSP at the payload's entry; APs at the test guest's AP entry, or
/// (for Linux) left in KVM's wait-for-SIPI state for the kernel to start.
fn setup_boot_vcpu(kvm: &Kvm, vcpu: &VcpuFd, index: u8, payload: &payload::Payload) -> Result<()> {
    cpu_setup::setup_msrs(kvm, vcpu)?;
    cpu_setup::setup_lint(vcpu)?;
    if index == 0 {
        match payload.protocol {
            payload::BootProtocol::Pvh => {
                cpu_setup::setup_pvh(vcpu, payload.entry, layout::PVH_START_INFO)?
            }
            payload::BootProtocol::Linux64 => {
                cpu_setup::setup_long_mode(vcpu, payload.entry, layout::ZERO_PAGE, 0)?
            }
        }
    } else if let Some(ap_entry) = payload.ap_entry {
        cpu_setup::setup_long_mode(vcpu, ap_entry, layout::ZERO_PAGE, index as u64)?;
        vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(|e| Error::kvm("KVM_SET_MP_STATE", e))?;
    }
    Ok(())
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
        self.console.detach(&self.listener);
        // The devices close here (taps and images: the next VM may open them), and with them
        // their references to the VM fd (MSI routes) and the memory.
        drop(std::mem::take(&mut self.devices));
        drop(self.dirty.get_mut().unwrap().take());
        let vcpus = std::mem::take(&mut self.vcpus);
        // SAFETY: drop runs once, and neither field is used after this: the reaper thread gets
        // these last references and ends the VM in the kernel (vCPU fds, VM fd, then memory).
        let (fd, ram) = unsafe {
            (
                ManuallyDrop::take(&mut self.fd),
                ManuallyDrop::take(&mut self.ram),
            )
        };
        reaper::defer(Box::new((vcpus, fd, ram)));
    }
}
