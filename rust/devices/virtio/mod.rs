//! virtio 1.x devices on the PCI transport (`pci`), their split virtqueues through rust-vmm's
//! virtio-queue, and the threads that serve them (`worker`).

pub mod block;
pub mod disk_image;
pub mod io_ring;
pub mod msix;
pub mod pci;
pub mod worker;

use virtio_queue::Queue;
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
    /// entries. Driver notifications are off meanwhile; with `rearm` they are back on at the end
    /// (and the queue looked at once more), without it the caller keeps looking.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMem,
        rearm: bool,
    ) -> bool;
    /// Answers the started requests of queue `index` that finished; true when it added used
    /// entries. Never blocks.
    fn complete(&mut self, _index: usize, _queue: &mut Queue, _mem: &GuestMem) -> bool {
        false
    }
    /// Requests started and not yet answered.
    fn in_flight(&self) -> usize {
        0
    }
    /// Readable when started requests finished: the worker polls it beside the kicks.
    fn completion_event(&self) -> Option<&EventFd> {
        None
    }
    /// The driver reset the device: waits for the requests in flight and answers none of them.
    fn reset(&mut self, _mem: &GuestMem) {}
    /// Makes what the device wrote durable on its backing (called once it is quiesced, so that
    /// another host on the same shared storage sees it).
    fn sync_backing(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
#[cfg(test)]
mod tests;
