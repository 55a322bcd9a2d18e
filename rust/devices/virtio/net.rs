//! virtio-net (virtio 1.2 §5.1) on a host tap: receive queue 0, transmit queue 1, control queue 2.
//!
//! Offered: the MAC in the device config, link status, the control queue, and
//! VIRTIO_NET_F_GUEST_ANNOUNCE (the announce bit is raised on a migration destination and after a
//! restore, and cleared by VIRTIO_NET_CTRL_ANNOUNCE_ACK). Not offered: checksum and segmentation
//! offloads (the tap hands over whole, checksummed frames) and mergeable receive buffers: without
//! guest offloads a frame is at most the tap's MTU plus 14, so each receive chain takes one frame
//! and the driver posts chains of at least 1526 bytes (§5.1.6.3.1). A frame larger than its chain
//! is dropped (and counted).
//!
//! Frames go through a bounce buffer on the device's worker thread: the copy into the guest goes
//! through vm-memory, which marks the pages dirty for migration, and a frame read from the tap
//! while the guest has no receive buffer posted waits there until it posts one.

use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::tap::Tap;
use super::{
    VirtioDevice, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMem;

pub const DEVICE_TYPE: u16 = 1;
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const CTRL: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
pub const CTRL_QUEUE_SIZE: u16 = 64;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
pub const VIRTIO_NET_S_ANNOUNCE: u16 = 2;
pub const VIRTIO_NET_CTRL_ANNOUNCE: u8 = 3;
pub const VIRTIO_NET_CTRL_ANNOUNCE_ACK: u8 = 0;
pub const VIRTIO_NET_OK: u8 = 0;
pub const VIRTIO_NET_ERR: u8 = 1;
/// struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const HDR_LEN: usize = 12;
/// mac, status, max_virtqueue_pairs.
const CONFIG_LEN: usize = 10;
/// The largest frame a tap hands over (64 KiB with a header), so a read never truncates one.
const BOUNCE_LEN: usize = HDR_LEN + 65536;

/// Frames and bytes through the device (CH's counter names, for `vm.counters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    announce: bool,
    /// The tap failed (its interface went away): link down, no more polling.
    broken: bool,
    /// Received frame (virtio header in front) waiting for a receive buffer: its length.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    queue_sizes: [u16; 3],
    pub counters: NetCounters,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            announce: false,
            broken: false,
            pending: None,
            rx_buf: vec![0; BOUNCE_LEN],
            tx_buf: Vec::with_capacity(BOUNCE_LEN),
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE],
            counters: NetCounters::default(),
        }
    }

    fn status(&self) -> u16 {
        let link = if self.broken { 0 } else { VIRTIO_NET_S_LINK_UP };
        let announce = if self.announce {
            VIRTIO_NET_S_ANNOUNCE
        } else {
            0
        };
        link | announce
    }

    /// The next frame from the tap into rx_buf with a virtio header of our own in front (no
    /// offloads: all zero, one buffer); its length with the header, None when none is waiting.
    fn read_frame(&mut self) -> Option<usize> {
        let skip = HDR_LEN - self.tap.hdr_len();
        loop {
            match self.tap.read(&mut self.rx_buf[skip..]) {
                Ok(n) if n > self.tap.hdr_len() => {
                    self.rx_buf[..HDR_LEN].fill(0);
                    self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                    return Some(skip + n);
                }
                Ok(_) => continue, // a frame without a body: nothing for the guest
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(_) => {
                    self.broken = true;
                    return None;
                }
            }
        }
    }

    /// Frames from the tap into the receive queue while both have some.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut added = false;
        // The driver need not kick while we have buffers: the tap's readiness drives this queue.
        let _ = queue.disable_notification(mem);
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => match self.read_frame() {
                    Some(len) => len,
                    None => return added,
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.pending = Some(len);
                // Out of buffers: ask for a kick when the driver posts more (or go on if it
                // already has).
                if queue.enable_notification(mem).unwrap_or(false) {
                    let _ = queue.disable_notification(mem);
                    continue;
                }
                return added;
            };
            self.pending = None;
            let head = chain.head_index();
            let writable: Vec<(u64, usize)> = chain
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr().0, d.len() as usize))
                .collect();
            let room: usize = writable.iter().map(|&(_, l)| l).sum();
            let mut written = 0;
            if room >= len {
                for (addr, l) in writable {
                    let take = l.min(len - written);
                    if take == 0 {
                        break;
                    }
                    if mem
                        .write_slice(&self.rx_buf[written..written + take], GuestAddress(addr))
                        .is_err()
                    {
                        break;
                    }
                    written += take;
                }
            }
            if written == len {
                self.counters.rx_frames += 1;
                self.counters.rx_bytes += (len - HDR_LEN) as u64;
            } else {
                written = 0;
                self.counters.rx_dropped += 1;
            }
            if queue.add_used(mem, head, written as u32).is_err() {
                return added;
            }
            added = true;
        }
    }

    /// Every frame the driver posted goes to the tap (header replaced: no offloads).
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut added = false;
        loop {
            let _ = queue.disable_notification(mem);
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                self.tx_buf.clear();
                let mut ok = true;
                for d in chain.filter(|d| !d.is_write_only()) {
                    let len = d.len() as usize;
                    let at = self.tx_buf.len();
                    if at + len > BOUNCE_LEN {
                        ok = false;
                        break;
                    }
                    self.tx_buf.resize(at + len, 0);
                    if mem
                        .read_slice(&mut self.tx_buf[at..], GuestAddress(d.addr().0))
                        .is_err()
                    {
                        ok = false;
                        break;
                    }
                }
                ok &= self.tx_buf.len() > HDR_LEN && !self.broken;
                if ok {
                    self.tx_buf[..HDR_LEN].fill(0);
                    let skip = HDR_LEN - self.tap.hdr_len();
                    ok = self.tap.write(&self.tx_buf[skip..]).is_ok();
                }
                if ok {
                    self.counters.tx_frames += 1;
                    self.counters.tx_bytes += (self.tx_buf.len() - HDR_LEN) as u64;
                } else {
                    self.counters.tx_dropped += 1;
                }
                if queue.add_used(mem, head, 0).is_err() {
                    return added;
                }
                added = true;
            }
            if !queue.enable_notification(mem).unwrap_or(false) {
                return added;
            }
        }
    }

    /// Control commands: {class, command, data...} then an ack byte the device writes. Only
    /// VIRTIO_NET_CTRL_ANNOUNCE_ACK is known (no other control feature is offered).
    fn control(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut added = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let (mut command, mut ack) = (Vec::new(), None);
            for d in chain {
                if d.is_write_only() {
                    ack = Some(GuestAddress(d.addr().0));
                } else if command.len() < 2 {
                    let mut b = [0u8; 2];
                    let n = (d.len() as usize).min(2 - command.len());
                    if mem
                        .read_slice(&mut b[..n], GuestAddress(d.addr().0))
                        .is_ok()
                    {
                        command.extend_from_slice(&b[..n]);
                    }
                }
            }
            let code = if command == [VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK] {
                self.announce = false;
                VIRTIO_NET_OK
            } else {
                VIRTIO_NET_ERR
            };
            let used = match ack {
                Some(at) => u32::from(mem.write_obj(code, at).is_ok()),
                None => 0,
            };
            if queue.add_used(mem, head, used).is_err() {
                return added;
            }
            added = true;
        }
        added
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_CTRL_VQ
            | VIRTIO_NET_F_GUEST_ANNOUNCE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&self.status().to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        data.copy_from_slice(&config[offset..offset + data.len()]);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMem) -> bool {
        match index {
            RX => self.receive(queue, mem),
            TX => self.transmit(queue, mem),
            CTRL => self.control(queue, mem),
            _ => false,
        }
    }

    fn backend_fd(&self, queues: &[Queue]) -> Option<RawFd> {
        // A held frame waits for a receive buffer (a kick), not for the tap.
        let can_take = queues[RX].ready() && self.pending.is_none() && !self.broken;
        can_take.then(|| self.tap.as_raw_fd())
    }

    fn reset(&mut self) {
        self.announce = false;
        self.pending = None;
    }

    fn announce(&mut self, driver_features: u64) -> bool {
        if driver_features & VIRTIO_NET_F_GUEST_ANNOUNCE == 0 {
            return false;
        }
        self.announce = true;
        true
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("rx_bytes", c.rx_bytes),
            ("rx_frames", c.rx_frames),
            ("rx_dropped", c.rx_dropped),
            ("tx_bytes", c.tx_bytes),
            ("tx_frames", c.tx_frames),
            ("tx_dropped", c.tx_dropped),
        ]
    }
}
