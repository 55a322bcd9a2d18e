//! virtio-vsock (virtio 1.2 §5.10): queues rx (0), tx (1) and event (2), the guest's CID in the
//! device config, packets parsed by rust-vmm's virtio-vsock crate over the descriptor chains,
//! the host side in `vsock_muxer`.
//!
//! Host-side connection state does not travel with a migration or snapshot, and a guest reboot
//! builds a new device: as in Firecracker, connections are reset. The guest learns it from a
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue once the restored device runs; the
//! host clients of the old VMM see their sockets closed when it goes.

use std::os::fd::{OwnedFd, RawFd};

use virtio_queue::{Queue, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestAddress};

use super::vsock_muxer::Muxer;
use super::{serve_available, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMem;

pub const DEVICE_TYPE: u16 = 19;
pub const QUEUE_SIZE: u16 = 256;
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const EVENT: usize = 2;
/// The largest payload of one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
pub const EVENT_TRANSPORT_RESET: u32 = 0;
const CONFIG_LEN: usize = 8;

pub struct Vsock {
    config: [u8; CONFIG_LEN],
    muxer: Muxer,
    /// A TRANSPORT_RESET is owed to the guest (state was restored).
    reset_owed: bool,
    /// The last tx batch stopped at its cap.
    tx_more: bool,
    queue_sizes: [u16; 3],
}

impl Vsock {
    /// The device for the guest with `cid`, serving host connections on `listener` (bound at
    /// `path`, which also names the guest's host ports as `path_P`).
    pub fn new(cid: u64, path: String, listener: OwnedFd) -> std::io::Result<Vsock> {
        Ok(Vsock {
            config: cid.to_le_bytes(),
            muxer: Muxer::new(cid, path, listener)?,
            reset_owed: false,
            tx_more: false,
            queue_sizes: [QUEUE_SIZE; 3],
        })
    }

    /// Every packet the guest queued on tx.
    fn drain_tx(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let served = serve_available(queue, mem, |mut chain| {
            // A malformed packet is consumed unanswered (no header to answer from).
            if let Ok(pkt) = VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                self.muxer.guest_packet(&pkt);
            }
            0
        });
        self.tx_more = served.more;
        served.added
    }

    /// Packets owed to the guest, as far as it has given rx buffers.
    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut added = false;
        while self.muxer.has_rx() {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break; // the guest kicks rx when it adds buffers
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.muxer.fill_rx(&mut pkt) {
                    Some(len) => len,
                    None => {
                        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                        break;
                    }
                },
                Err(_) => 0, // unusable buffer: returned empty
            };
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            added = true;
        }
        added
    }

    fn send_events(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        if !self.reset_owed {
            return false;
        }
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let written = match chain.next() {
            Some(d) if d.is_write_only() && d.len() >= 4 => mem
                .write_obj(EVENT_TRANSPORT_RESET.to_le(), GuestAddress(d.addr().0))
                .map_or(0, |()| 4),
            _ => 0,
        };
        if written > 0 {
            self.reset_owed = false;
        }
        queue.add_used(mem, head, written).is_ok()
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        data.copy_from_slice(&self.config[offset..offset + data.len()]);
    }

    /// Always re-arms (no idle polling window: the host sockets bring most work).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMem,
        _rearm: bool,
    ) -> bool {
        match index {
            RX => self.fill_rx(queue, mem),
            TX => self.drain_tx(queue, mem),
            EVENT => self.send_events(queue, mem),
            _ => false,
        }
    }

    /// tx first (its packets make answers), then the host sockets, then rx and event.
    fn process_all(&mut self, queues: &mut [Queue], mem: &GuestMem, rearm: bool) -> u64 {
        let mut used = 0;
        if queues[TX].ready() && self.drain_tx(&mut queues[TX], mem) {
            used |= 1 << TX;
        }
        self.muxer.host_events();
        for i in [RX, EVENT] {
            if queues[i].ready() && self.process_queue(i, &mut queues[i], mem, rearm) {
                used |= 1 << i;
            }
        }
        used
    }

    fn backend_fd(&self, _queues: &[Queue]) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn has_more(&self) -> bool {
        self.tx_more
    }

    fn reset(&mut self, _mem: &GuestMem) {
        self.muxer.reset();
        self.reset_owed = false;
        self.tx_more = false;
    }

    fn moved(&mut self, _driver_features: u64) -> bool {
        self.muxer.reset();
        self.reset_owed = true;
        false
    }
}
