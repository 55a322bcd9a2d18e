//! The virtio-pci modern transport (virtio 1.2 §4.1): vendor 0x1af4, device 0x1040 + type,
//! revision 1, with the common, notify, ISR, device and PCI-config-access capabilities and MSI-X,
//! all in one 64-bit memory BAR0. BAR0's layout is in docs/devices.md.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::msix::{Msix, MsixState, CONTROL_ENABLE, CONTROL_FUNCTION_MASK};
use super::{
    ConfigChange, VirtioDevice, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::devices::pci::config_space::{Bar, ConfigSpace, Identity};
use crate::devices::pci::PciFunction;
use crate::memory::GuestRam;

pub const VIRTIO_VENDOR: u16 = 0x1af4;
pub const BAR0_SIZE: u64 = 0x8000;
pub const COMMON_OFFSET: u64 = 0x0000;
pub const COMMON_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_OFFSET: u64 = 0x2000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
const REGION: u64 = 0x1000;
pub const NO_VECTOR: u16 = 0xffff;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Called whenever the device interrupts the guest: a vCPU sleeping in the idle port wakes, as an
/// interrupt ends HLT.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

/// The transport's own registers: what a migration or snapshot carries besides config space,
/// the queues and MSI-X.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportState {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
    pub config_vector: u16,
    pub isr: u8,
}

/// Everything a virtio-pci device saves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioPciState {
    pub config_space: Vec<u8>,
    pub transport: TransportState,
    pub queues: Vec<QueueState>,
    pub queue_vectors: Vec<u16>,
    pub msix: MsixState,
}

pub struct VirtioPci {
    config: ConfigSpace,
    device: Box<dyn VirtioDevice>,
    regs: TransportState,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    msix: Msix,
    msix_cap: usize,
    pci_cfg_cap: usize,
    /// Kick eventfds by queue: KVM writes them on a notify-register write (ioeventfd); the
    /// transport writes them itself when the guest moved BAR0 away from where they are registered.
    kicks: Vec<EventFd>,
    /// Written when the driver finishes set-up, so that the worker looks at the queues.
    wake: EventFd,
    ram: Arc<GuestRam>,
    waker: Option<Waker>,
}

/// A virtio capability's body after its id and next bytes.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut body = vec![16 + extra.len() as u8, cfg_type, 0, 0, 0, 0];
    body.extend((offset as u32).to_le_bytes());
    body.extend((length as u32).to_le_bytes());
    body.extend(extra);
    body
}

impl VirtioPci {
    /// A device with BAR0 at `bar0` (allocated by the caller), MSI-X through `msix` (one vector per
    /// queue plus one for config changes), waking its worker with `kicks` and `wake`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar0: u64,
        msix: Msix,
        kicks: Vec<EventFd>,
        wake: EventFd,
        ram: Arc<GuestRam>,
    ) -> VirtioPci {
        let kind = device.device_type();
        let id = Identity {
            vendor: VIRTIO_VENDOR,
            device: 0x1040 + kind,
            revision: 1,
            class: class_of(kind),
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: kind,
        };
        let mut config = ConfigSpace::new(&id);
        config.add_bar64(
            0,
            Bar {
                size: BAR0_SIZE,
                prefetchable: false,
            },
            bar0,
        );
        let vectors = msix.vectors() as u16;
        let mut body = (vectors - 1).to_le_bytes().to_vec();
        body.extend((MSIX_TABLE_OFFSET as u32).to_le_bytes()); // BIR 0
        body.extend((MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_cap = config.add_capability(
            CAP_MSIX,
            &body,
            &[u32::from(CONTROL_ENABLE | CONTROL_FUNCTION_MASK) << 16],
        );
        let nq = device.queue_max_sizes().len() as u64;
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_COMMON, COMMON_OFFSET, COMMON_LEN, &[]),
            &[],
        );
        config.add_capability(CAP_VENDOR, &virtio_cap(CFG_ISR, ISR_OFFSET, 1, &[]), &[]);
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_DEVICE, DEVICE_OFFSET, device.config_len() as u64, &[]),
            &[],
        );
        let notify_len = nq * u64::from(NOTIFY_MULTIPLIER);
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                notify_len,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        );
        // The access window: bar (byte 4), offset, length and data are the driver's to write.
        let pci_cfg_cap = config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_PCI, 0, 0, &[0; 4]),
            &[0, 0xff, u32::MAX, u32::MAX, u32::MAX],
        );
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("valid queue size"))
            .collect();
        let queue_vectors = vec![NO_VECTOR; nq as usize];
        let regs = TransportState {
            config_vector: NO_VECTOR,
            ..Default::default()
        };
        VirtioPci {
            config,
            device,
            regs,
            queues,
            queue_vectors,
            msix,
            msix_cap,
            pci_cfg_cap,
            kicks,
            wake,
            ram,
            waker: None,
        }
    }

    pub fn set_waker(&mut self, waker: Waker) {
        self.waker = Some(waker);
    }

    /// Raises `vector` with `isr` latched in the ISR register.
    fn interrupt(&mut self, vector: u16, isr: u8) {
        self.regs.isr |= isr;
        self.msix.signal(vector);
        if let Some(w) = &self.waker {
            w();
        }
    }

    /// Where queue `q`'s notify register is while BAR0 is at `bar0`.
    pub fn notify_address(bar0: u64, q: usize) -> u64 {
        bar0 + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_MULTIPLIER)
    }

    /// Device reset (status 0 written, or a fresh device): queues disabled, features cleared.
    fn reset(&mut self) {
        self.device.reset(&self.ram.mem);
        self.regs = TransportState {
            config_vector: NO_VECTOR,
            config_generation: self.regs.config_generation,
            ..Default::default()
        };
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_vectors.fill(NO_VECTOR);
    }

    fn driver_ok(&self) -> bool {
        self.regs.status & STATUS_DRIVER_OK != 0 && self.regs.status & STATUS_FAILED == 0
    }

    /// Answers the requests that finished, serves or starts the available ones, and signals the
    /// queues that got used entries. The worker calls it; true when a queue stopped at its batch
    /// cap, so the worker serves again before it waits.
    pub fn process_queues(&mut self) -> bool {
        let _ = self.serve(true, true);
        self.device.has_more()
    }

    /// As `process_queues`, but leaves driver notifications off (the worker keeps looking);
    /// true when it answered or took a request.
    pub fn poll_queues(&mut self) -> bool {
        self.serve(true, false)
    }

    pub fn in_flight(&self) -> usize {
        self.device.in_flight()
    }

    pub fn idle_poll(&self) -> Duration {
        self.device.idle_poll()
    }

    /// Answers the requests that finished, taking no new ones (quiesce); returns how many are
    /// still in flight.
    pub fn complete_queues(&mut self) -> usize {
        let _ = self.serve(false, true);
        self.device.in_flight()
    }

    /// Readable when requests in flight finished (a dup, for the worker's poll).
    pub fn completion_event(&self) -> std::io::Result<Option<EventFd>> {
        self.device
            .completion_event()
            .map(EventFd::try_clone)
            .transpose()
    }

    /// Answers what finished, then (with `take_new`, while the driver runs the device) serves or
    /// starts what is available; interrupts the queues that got used entries. True when a
    /// request was answered or taken.
    fn serve(&mut self, take_new: bool, rearm: bool) -> bool {
        let take_new = take_new && self.driver_ok();
        let before = self.device.in_flight();
        let mem = &self.ram.mem;
        let mut used = 0u64;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready() && self.device.complete(i, q, mem) {
                used |= 1 << i;
            }
        }
        if take_new {
            used |= self.device.process_all(&mut self.queues, mem, rearm);
        }
        for i in (0..self.queues.len()).filter(|i| used & (1 << i) != 0) {
            if self.wants_interrupt(i) {
                self.interrupt(self.queue_vectors[i], ISR_QUEUE);
            }
        }
        if take_new {
            let change = self.device.take_config_change();
            self.config_changed(change);
        }
        used != 0 || self.device.in_flight() != before
    }

    /// A new config generation for a change; for the device's own, ISR bit 1 and the config
    /// vector too.
    fn config_changed(&mut self, change: ConfigChange) {
        if change == ConfigChange::None {
            return;
        }
        self.regs.config_generation = self.regs.config_generation.wrapping_add(1);
        if change == ConfigChange::Notify {
            self.interrupt(self.regs.config_vector, ISR_CONFIG);
        }
    }

    /// The host fd the worker also waits on, while the driver runs the device.
    pub fn backend_fd(&self) -> Option<RawFd> {
        if !self.driver_ok() {
            return None;
        }
        self.device.backend_fd(&self.queues)
    }

    /// The device runs in a new VMM (after a migration or restore); a config it changed for
    /// that is signalled to the driver: new generation, ISR bit 1, the config vector.
    pub fn moved(&mut self) {
        if self.driver_ok() && self.device.moved(self.regs.driver_features) {
            self.config_changed(ConfigChange::Notify);
        }
    }

    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.device.counters()
    }

    pub fn sync_backing(&mut self) -> std::io::Result<()> {
        self.device.sync_backing()
    }

    /// Whether the driver wants an interrupt for queue `i`'s new used entries: with EVENT_IDX as
    /// `used_event` says; without, unless it set VRING_AVAIL_F_NO_INTERRUPT (virtio-queue does not
    /// look at that flag).
    fn wants_interrupt(&mut self, i: usize) -> bool {
        let mem = &self.ram.mem;
        let q = &mut self.queues[i];
        let wanted = q.needs_notification(mem).unwrap_or(true);
        if q.event_idx_enabled() {
            return wanted;
        }
        let flags: u16 = mem.read_obj(GuestAddress(q.avail_ring())).unwrap_or(0);
        flags & VRING_AVAIL_F_NO_INTERRUPT == 0
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.regs.queue_select as usize)
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.regs.queue_select as usize;
        let value: u64 = match offset {
            0x00 => u64::from(self.regs.device_feature_select),
            0x04 => match self.regs.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.regs.driver_feature_select),
            0x0c => match self.regs.driver_feature_select {
                0 => self.regs.driver_features & 0xffff_ffff,
                1 => self.regs.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.regs.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.regs.status),
            0x15 => u64::from(self.regs.config_generation),
            0x16 => u64::from(self.regs.queue_select),
            0x18 => self.queues.get(q).map_or(0, |q| u64::from(q.size())),
            0x1a => self
                .queue_vectors
                .get(q)
                .map_or(u64::from(NO_VECTOR), |&v| u64::from(v)),
            0x1c => self.queues.get(q).map_or(0, |q| u64::from(q.ready())),
            0x1e => q as u64,
            0x20 | 0x24 => {
                self.queues.get(q).map_or(0, |q| q.desc_table()) >> (8 * (offset - 0x20))
            }
            0x28 | 0x2c => {
                self.queues.get(q).map_or(0, |q| q.avail_ring()) >> (8 * (offset - 0x28))
            }
            0x30 | 0x34 => self.queues.get(q).map_or(0, |q| q.used_ring()) >> (8 * (offset - 0x30)),
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        // Queue registers change only while the queue is disabled (§4.1.4.3.2), and nothing but
        // the status changes once the driver is done (DRIVER_OK) except vectors.
        let configurable = self.selected().is_some_and(|q| !q.ready());
        match offset {
            0x00 => self.regs.device_feature_select = value as u32,
            0x08 => self.regs.driver_feature_select = value as u32,
            0x0c if self.regs.status & (STATUS_DRIVER | STATUS_FEATURES_OK) == STATUS_DRIVER => {
                let offered = self.device.features();
                match self.regs.driver_feature_select {
                    0 => {
                        self.regs.driver_features = (self.regs.driver_features & !0xffff_ffff)
                            | (value & 0xffff_ffff & offered)
                    }
                    1 => {
                        self.regs.driver_features =
                            (self.regs.driver_features & 0xffff_ffff) | (value << 32 & offered)
                    }
                    _ => {}
                }
            }
            0x10 => self.regs.config_vector = self.vector_or_none(value as u16),
            0x14 => self.write_status(value as u8),
            0x16 => self.regs.queue_select = value as u16,
            0x18 if configurable => {
                if let Some(q) = self.selected() {
                    // virtio-queue refuses sizes that are not powers of two up to the maximum.
                    let _ = q.try_set_size(value as u16);
                }
            }
            0x1a => {
                let v = self.vector_or_none(value as u16);
                if let Some(slot) = self.queue_vectors.get_mut(self.regs.queue_select as usize) {
                    *slot = v;
                }
            }
            0x1c if configurable && value == 1 => self.enable_selected(),
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 if configurable => {
                let q = self.selected().expect("configurable means selected");
                let (lo, hi) = if offset.is_multiple_of(8) {
                    (
                        Some(value as u32),
                        (data.len() == 8).then_some((value >> 32) as u32),
                    )
                } else {
                    (None, Some(value as u32))
                };
                match offset & !7 {
                    0x20 => q.set_desc_table_address(lo, hi),
                    0x28 => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            _ => {}
        }
    }

    fn vector_or_none(&self, v: u16) -> u16 {
        if (v as usize) < self.msix.vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn enable_selected(&mut self) {
        let event_idx = self.regs.driver_features & VIRTIO_F_RING_EVENT_IDX != 0;
        let mem = &self.ram.mem;
        let Some(q) = self.queues.get_mut(self.regs.queue_select as usize) else {
            return;
        };
        q.set_event_idx(event_idx);
        // A queue whose rings are not in guest RAM stays disabled (is_valid looks at ready too).
        q.set_ready(true);
        if !q.is_valid(mem) {
            q.set_ready(false);
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let mut status = status;
        if status & STATUS_FEATURES_OK != 0 && self.regs.status & STATUS_FEATURES_OK == 0 {
            // Modern devices only: without VERSION_1 the driver reads FEATURES_OK back clear.
            if self.regs.driver_features & VIRTIO_F_VERSION_1 == 0 {
                status &= !STATUS_FEATURES_OK;
            }
        }
        let was_ok = self.driver_ok();
        self.regs.status = status;
        if !was_ok && self.driver_ok() {
            let _ = self.wake.write(1);
        }
    }

    fn read_bar0(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_LEN => self.read_common(o, data),
            ISR_OFFSET => {
                data.fill(0);
                data[0] = std::mem::take(&mut self.regs.isr);
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + REGION).contains(&o) => {
                let off = (o - DEVICE_OFFSET) as usize;
                if off + data.len() <= self.device.config_len() {
                    self.device.read_config(off, data);
                } else {
                    data.fill(0);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + REGION).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + REGION).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn write_bar0(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_LEN => self.write_common(o, data),
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION).contains(&o) => {
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(kick) = self.kicks.get(q) {
                    let _ = kick.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + REGION).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    /// The PCI-config-access capability's window (§4.1.4.9): (bar, offset, length) as the driver
    /// set them.
    fn pci_cfg_window(&self) -> (u8, u64, usize) {
        let reg = self.pci_cfg_cap / 4;
        let bar = (self.config.read(reg + 1) & 0xff) as u8;
        (
            bar,
            u64::from(self.config.read(reg + 2)),
            self.config.read(reg + 3) as usize,
        )
    }

    pub fn save(&self) -> VirtioPciState {
        VirtioPciState {
            config_space: self.config.bytes(),
            transport: self.regs.clone(),
            queues: self.queues.iter().map(|q| q.state()).collect(),
            queue_vectors: self.queue_vectors.clone(),
            msix: self.msix.state().clone(),
        }
    }

    pub fn restore(&mut self, st: &VirtioPciState) -> Result<(), String> {
        if st.queues.len() != self.queues.len() || st.queue_vectors.len() != self.queues.len() {
            return Err(format!(
                "device state has {} queues, the device {}",
                st.queues.len(),
                self.queues.len()
            ));
        }
        self.config.restore(&st.config_space)?;
        let mut queues = Vec::new();
        for (saved, q) in st.queues.iter().zip(&self.queues) {
            if saved.max_size != q.max_size() {
                return Err(format!(
                    "queue state has max size {}, the device {}",
                    saved.max_size,
                    q.max_size()
                ));
            }
            let restored = Queue::try_from(*saved).map_err(|e| format!("queue state: {e}"))?;
            if restored.ready() && !restored.is_valid(&self.ram.mem) {
                return Err("a ready queue's rings are outside guest RAM".into());
            }
            queues.push(restored);
        }
        self.msix.restore(&st.msix)?;
        if st.transport.driver_features & !self.device.features() != 0 {
            return Err(format!(
                "device state negotiated features {:#x} the device does not offer",
                st.transport.driver_features
            ));
        }
        self.queues = queues;
        self.queue_vectors = st
            .queue_vectors
            .iter()
            .map(|&v| self.vector_or_none(v))
            .collect();
        self.regs = st.transport.clone();
        Ok(())
    }
}

fn class_of(kind: u16) -> (u8, u8, u8) {
    match kind {
        1 => (0x02, 0x00, 0x00),  // network, Ethernet
        2 => (0x01, 0x80, 0x00),  // mass storage, other
        19 => (0x07, 0x80, 0x00), // communication, other
        _ => (0xff, 0x00, 0x00),
    }
}

impl PciFunction for VirtioPci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn read_config(&mut self, reg: usize) -> u32 {
        if reg == self.pci_cfg_cap / 4 + 4 {
            let (bar, offset, len) = self.pci_cfg_window();
            let mut buf = [0u8; 4];
            if bar == 0 && matches!(len, 1 | 2 | 4) {
                self.read_bar0(offset, &mut buf[..len]);
            }
            return u32::from_le_bytes(buf);
        }
        self.config.read(reg)
    }

    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg == self.pci_cfg_cap / 4 + 4 {
            let (bar, off, len) = self.pci_cfg_window();
            if bar == 0 && matches!(len, 1 | 2 | 4) && offset == 0 && data.len() >= len {
                self.write_bar0(off, &data[..len]);
            }
            return;
        }
        self.config.write(reg, offset, data);
        if reg == self.msix_cap / 4 {
            self.msix.set_control((self.config.read(reg) >> 16) as u16);
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 {
            self.read_bar0(offset, data);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 {
            self.write_bar0(offset, data);
        }
    }
}
