//! virtio 1.x devices on the PCI transport (`pci`), their split virtqueues through rust-vmm's
//! virtio-queue, and the threads that serve them (`worker`).

pub mod block;
pub mod disk_image;
pub mod msix;
pub mod pci;
pub mod worker;

use virtio_queue::Queue;

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
    /// Serves the available requests on queue `index`; true when it added used entries.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMem) -> bool;
    /// Makes what the device wrote durable on its backing (called once it is quiesced, so that
    /// another host on the same shared storage sees it).
    fn sync_backing(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
#[cfg(test)]
mod tests;
