//! virtio 1.x devices on the PCI transport (`pci`), their split virtqueues through rust-vmm's
//! virtio-queue, and the threads that serve them (`worker`).

pub mod block;
pub mod disk_image;
pub mod io_ring;
pub mod msix;
pub mod net;
pub mod pci;
pub mod tap;
pub mod vsock;
pub mod vsock_connection;
pub mod vsock_muxer;
pub mod worker;

use std::os::fd::RawFd;
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMem;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

/// Device status bits (virtio 1.2 §2.1).
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_FAILED: u8 = 0x80;

/// A change of a device's config space (virtio 1.2 §4.1.4.3.1: the device presents a new
/// config_generation after each one, so that a driver reading several fields sees them whole).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConfigChange {
    #[default]
    None,
    /// The driver asked for it (virtio-net's ANNOUNCE_ACK): a new generation, no interrupt.
    Requested,
    /// The device's own (a link going down): a new generation and a configuration change
    /// notification (ISR bit 1, the config vector).
    Notify,
}

/// What a device type adds to the transport: its features, queues and config space, and the
/// processing of its queues.
pub trait VirtioDevice: Send {
    /// The virtio device type (2 for block).
    fn device_type(&self) -> u16;
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> &[u16];
    fn config_len(&self) -> usize;
    fn read_config(&self, offset: usize, data: &mut [u8]);
    /// Serves the available requests on queue `index`, or starts them; true when it added used
    /// entries. With `rearm` the device leaves the queue's driver notifications as it needs them
    /// (re-enabled, and the queue looked at once more, when it wants a kick); without (only for a
    /// device with an `idle_poll` window) the caller keeps looking and calls again with `rearm`
    /// before it sleeps. With EVENT_IDX only `enable_notification` moves avail_event, so a queue
    /// left without it gets no kick until the driver's index wraps.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMem,
        rearm: bool,
    ) -> bool;
    /// Serves every ready queue; a bit per queue that got used entries. Devices whose queues
    /// depend on each other (vsock: a packet on tx makes an answer on rx) choose the order.
    fn process_all(&mut self, queues: &mut [Queue], mem: &GuestMem, rearm: bool) -> u64 {
        let mut used = 0;
        for (i, q) in queues.iter_mut().enumerate() {
            if q.ready() && self.process_queue(i, q, mem, rearm) {
                used |= 1 << i;
            }
        }
        used
    }
    /// Answers the started requests of queue `index` that finished; true when it added used
    /// entries. Never blocks.
    fn complete(&mut self, _index: usize, _queue: &mut Queue, _mem: &GuestMem) -> bool {
        false
    }
    /// Requests started and not yet answered (a device that answers each at once has none).
    fn in_flight(&self) -> usize {
        0
    }
    /// Readable when started requests finished: the worker polls it beside the kicks.
    fn completion_event(&self) -> Option<&EventFd> {
        None
    }
    /// How long the worker keeps looking at the queues after the last request while nothing is
    /// in flight, for a driver that sends its next request right after an answer. Zero (the
    /// default): it sleeps at once, as for devices whose work mostly comes from the host side.
    fn idle_poll(&self) -> Duration {
        Duration::ZERO
    }
    /// Makes what the device wrote durable on its backing (called once it is quiesced, so that
    /// another host on the same shared storage sees it).
    fn sync_backing(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// A host fd the worker polls besides the kicks while the device can take what it brings
    /// (a tap with frames for the guest, vsock's epoll over its host sockets); readable means
    /// `process_all` has work. None when there is nothing to wait for.
    fn backend_fd(&self, _queues: &[Queue]) -> Option<RawFd> {
        None
    }
    /// Device reset (status 0): device-specific and host-side state back to a fresh device's;
    /// requests in flight are waited for and answered none.
    fn reset(&mut self, _mem: &GuestMem) {}
    /// After a migration or restore, once the transport state is loaded: the device runs in a
    /// new VMM, whose host side did not come along (virtio-net raises its announce bit, vsock
    /// owes the guest a transport reset); true when the config changed.
    fn moved(&mut self, _driver_features: u64) -> bool {
        false
    }
    /// A queue's last batch stopped at its cap (`serve_available`'s `more`): the worker serves the
    /// device again before it waits for an event.
    fn has_more(&self) -> bool {
        false
    }
    /// How the config changed since the last call (the transport calls it after each batch).
    fn take_config_change(&mut self) -> ConfigChange {
        ConfigChange::None
    }
    /// Named counters, as Cloud Hypervisor's `vm.counters` reports them per device.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}
/// What one call of `serve_available` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Used entries were added.
    pub added: bool,
    /// It stopped at its cap with chains perhaps still available: the queue must be served again
    /// without waiting for a kick (which the driver need not send, kicks being off).
    pub more: bool,
}

/// Serves the chains the driver made available on `queue` with `serve` (which returns the bytes
/// it wrote, for the used ring), at most the queue's size in one call: a driver that keeps the
/// ring full must not keep the device (and its lock, which vCPUs' register accesses and a pause
/// wait for) on one queue. Kicks are off while it works and re-armed before it returns, with a
/// last look at the ring for chains made available meanwhile: under VIRTIO_RING_F_EVENT_IDX only
/// `enable_notification` writes avail_event, so a queue that skipped it would never be kicked
/// again once the driver passed the stale value.
pub fn serve_available(
    queue: &mut Queue,
    mem: &GuestMem,
    mut serve: impl FnMut(DescriptorChain<&GuestMem>) -> u32,
) -> Served {
    let mut done = Served::default();
    let mut budget = queue.size();
    loop {
        // Errors here mean the rings left guest RAM; the queue then just stops serving.
        let _ = queue.disable_notification(mem);
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = serve(chain);
            if queue.add_used(mem, head, len).is_err() {
                return done;
            }
            done.added = true;
            budget = budget.saturating_sub(1);
            if budget == 0 {
                done.more = true;
                return done;
            }
        }
        if !queue.enable_notification(mem).unwrap_or(false) {
            return done;
        }
    }
}

#[cfg(test)]
mod tests;
