//! virtio 1.x devices on the PCI transport (`pci`), their split virtqueues through rust-vmm's
//! virtio-queue, and the threads that serve them (`worker`).

pub mod block;
pub mod disk_image;
pub mod msix;
pub mod pci;
pub mod vsock;
pub mod vsock_connection;
pub mod vsock_muxer;
pub mod worker;

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueT};

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
    /// Serves every ready queue; a bit per queue that got used entries. Devices whose queues
    /// depend on each other (vsock: a packet on tx makes an answer on rx) choose the order.
    fn process_all(&mut self, queues: &mut [Queue], mem: &GuestMem) -> u64 {
        let mut used = 0;
        for (i, q) in queues.iter_mut().enumerate() {
            if q.ready() && self.process_queue(i, q, mem) {
                used |= 1 << i;
            }
        }
        used
    }
    /// A descriptor the worker waits on beside the kicks (host sockets); readable means
    /// `process_all` has work.
    fn host_fd(&self) -> Option<RawFd> {
        None
    }
    /// The driver reset the device: host-side state goes too.
    fn reset(&mut self) {}
    /// Transport state was loaded from a snapshot or migration; host-side state did not come.
    fn restored(&mut self) {}
    /// Makes what the device wrote durable on its backing (called once it is quiesced, so that
    /// another host on the same shared storage sees it).
    fn sync_backing(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
#[cfg(test)]
mod tests;
