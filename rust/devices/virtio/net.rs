//! virtio-net (virtio 1.2 §5.1) on a host tap: receive queue 0, transmit queue 1, control queue 2.
//!
//! Offered: the MAC in the device config, link status, the control queue, and
//! VIRTIO_NET_F_GUEST_ANNOUNCE (the announce bit is raised on a migration destination and after a
//! restore, and cleared by VIRTIO_NET_CTRL_ANNOUNCE_ACK). Not offered: checksum and segmentation
//! offloads (the tap hands over whole, checksummed frames) and mergeable receive buffers: without
//! guest offloads a frame is at most the tap's MTU plus 14, so each receive chain takes one frame
//! and the driver posts chains of at least 1526 bytes (§5.1.6.3.1). A frame larger than its chain
//! (or than the bounce buffer) is dropped (and counted).
//!
//! Frames go through a bounce buffer on the device's worker thread: the copy into the guest goes
//! through vm-memory, which marks the pages dirty for migration, and a frame read from the tap
//! while the guest has no receive buffer posted waits there until it posts one.

use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::tap::Tap;
use super::{
    serve_available, ConfigChange, Served, VirtioDevice, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
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
/// The largest frame a tap hands over: its largest MTU (64 KiB less its 14-byte header) with the
/// Ethernet header, and a VLAN tag a packet socket may add.
const MAX_FRAME: usize = 65535 + 4;
/// A byte more than a header and the largest frame: read(2) on a tap cuts a frame longer than
/// the buffer short without a word (only recvmsg would say MSG_TRUNC), so a read that fills the
/// buffer is one cut short.
const BOUNCE_LEN: usize = HDR_LEN + MAX_FRAME + 1;

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

/// What one read from the tap gave.
enum TapRead {
    /// A frame, in rx_buf: its length with the virtio header.
    Frame(usize),
    /// A frame that is not the guest's to have (cut short by the buffer, or empty).
    Dropped,
    /// Nothing waiting (or the tap failed).
    Empty,
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
    /// By queue: its last batch stopped at its cap.
    more: [bool; 3],
    /// The status changed since the transport last asked.
    config_change: ConfigChange,
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
            more: [false; 3],
            config_change: ConfigChange::None,
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
    /// offloads: all zero, one buffer).
    fn read_frame(&mut self) -> TapRead {
        let skip = HDR_LEN - self.tap.hdr_len();
        let room = self.rx_buf.len() - skip;
        loop {
            return match self.tap.read(&mut self.rx_buf[skip..]) {
                // Cut short (see BOUNCE_LEN); more than the buffer would be a kernel bug: dropped too.
                Ok(n) if n >= room => TapRead::Dropped,
                Ok(n) if n > self.tap.hdr_len() => {
                    self.rx_buf[..HDR_LEN].fill(0);
                    self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                    TapRead::Frame(skip + n)
                }
                Ok(_) => TapRead::Dropped, // a frame without a body: nothing for the guest
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => TapRead::Empty,
                Err(_) => {
                    // Link down: the driver is told (a config change of the device's own).
                    if !self.broken {
                        self.broken = true;
                        self.config_change = ConfigChange::Notify;
                    }
                    TapRead::Empty
                }
            };
        }
    }

    /// Frames from the tap into the receive queue while both have some, at most the queue's size
    /// in one call (as `serve_available` caps the others: a flood from the host must not keep the
    /// device on this queue).
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut added = false;
        self.more[RX] = false;
        // The driver need not kick while we have buffers: the tap's readiness drives this queue.
        let _ = queue.disable_notification(mem);
        for _ in 0..queue.size() {
            let len = match self.pending {
                Some(len) => len,
                None => match self.read_frame() {
                    TapRead::Frame(len) => len,
                    TapRead::Dropped => {
                        self.counters.rx_dropped += 1;
                        continue;
                    }
                    TapRead::Empty => return added,
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
        self.more[RX] = true;
        added
    }

    /// A queue served through `serve_available`: its `more` kept, whether it added used entries.
    fn served(&mut self, index: usize, served: Served) -> bool {
        self.more[index] = served.more;
        served.added
    }

    /// Every frame the driver posted goes to the tap (header replaced: no offloads).
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let served = serve_available(queue, mem, |chain| {
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
            0
        });
        self.served(TX, served)
    }

    /// Control commands: {class, command, data...} then an ack byte the device writes. Only
    /// VIRTIO_NET_CTRL_ANNOUNCE_ACK is known (no other control feature is offered).
    fn control(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let served = serve_available(queue, mem, |chain| {
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
                if std::mem::take(&mut self.announce) {
                    self.config_change = self.config_change.max(ConfigChange::Requested);
                }
                VIRTIO_NET_OK
            } else {
                VIRTIO_NET_ERR
            };
            match ack {
                Some(at) => u32::from(mem.write_obj(code, at).is_ok()),
                None => 0,
            }
        });
        self.served(CTRL, served)
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

    /// Always re-arms (no idle polling window: the tap, not an answer, brings most work).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMem,
        _rearm: bool,
    ) -> bool {
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

    fn has_more(&self) -> bool {
        self.more.contains(&true)
    }

    fn take_config_change(&mut self) -> ConfigChange {
        std::mem::take(&mut self.config_change)
    }

    fn reset(&mut self, _mem: &GuestMem) {
        self.announce = false;
        self.pending = None;
        self.more = [false; 3];
        self.config_change = ConfigChange::None;
    }

    fn moved(&mut self, driver_features: u64) -> bool {
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

#[cfg(test)]
mod tests {
    //! The device against a real tap in the test thread's own network namespace: frames the
    //! device sends are read off the tap's interface with a packet socket, frames sent into the
    //! interface come out in the guest's buffers.

    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, MmapRegion};

    use super::*;
    use crate::devices::pci::PciFunction;
    use crate::devices::virtio::msix::Msix;
    use crate::devices::virtio::pci::{VirtioPci, DEVICE_OFFSET, ISR_OFFSET};
    use crate::devices::virtio::tap::private_netns_for_taps;
    use crate::devices::virtio::{STATUS_DRIVER_OK, STATUS_FEATURES_OK};
    use crate::memory::GuestRam;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const DESC: u64 = 0x10000;
    const AVAIL: u64 = 0x11000;
    const USED: u64 = 0x12000;
    const BUFS: u64 = 0x20000;
    const QSIZE: u16 = 16;
    /// An ethertype for local experiments: nothing else on the host sends it.
    const PROTO: u16 = 0x88b5;

    struct Rig {
        name: String,
        net: Net,
        ram: Arc<GuestRam>,
        queue: Queue,
        avail: u16,
        sock: OwnedFd,
    }

    fn rig(tag: &str) -> Option<Rig> {
        if !private_netns_for_taps() {
            return None;
        }
        let name = format!("vn{}{tag}", std::process::id() % 100_000);
        let tap = Tap::open(&name, None).unwrap();
        // No IPv6 chatter from the host on the new interface (best effort).
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let cname = std::ffi::CString::new(name.clone()).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert_ne!(ifindex, 0);
        // SAFETY: plain socket(2); the result is checked and owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                i32::from(PROTO.to_be()),
            )
        };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = PROTO.to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0);
        let ram = GuestRam::with_ranges(&[(0, 4 << 20)]).unwrap();
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(&ram.mem));
        let net = Net::new(tap, [0x52, 0x54, 0, 1, 2, 3]);
        Some(Rig {
            name,
            net,
            ram,
            queue,
            avail: 0,
            sock,
        })
    }

    impl Rig {
        /// Publishes a one-descriptor chain at slot `i`: BUFS + i * 4 KiB, `len` bytes.
        fn post(&mut self, i: u16, len: u32, write: bool, data: &[u8]) {
            let mem = &self.ram.mem;
            let addr = BUFS + u64::from(i) * 4096;
            mem.write_slice(data, GuestAddress(addr)).unwrap();
            let d = DESC + u64::from(i) * 16;
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(if write { 2u16 } else { 0 }, GuestAddress(d + 12))
                .unwrap();
            let slot = AVAIL + 4 + u64::from(self.avail % QSIZE) * 2;
            mem.write_obj(i, GuestAddress(slot)).unwrap();
            self.avail = self.avail.wrapping_add(1);
            mem.write_obj(self.avail, GuestAddress(AVAIL + 2)).unwrap();
        }

        /// Publishes a control command at slots `i` (the command, readable) and `i + 1` (its ack
        /// byte, writable, preset to 0xff); the ack byte's address.
        fn post_command(&mut self, i: u16, cmd: [u8; 2]) -> GuestAddress {
            self.post(i, 2, false, &cmd);
            let mem = &self.ram.mem;
            let d = DESC + u64::from(i) * 16;
            mem.write_obj(1u16, GuestAddress(d + 12)).unwrap(); // NEXT
            mem.write_obj(i + 1, GuestAddress(d + 14)).unwrap();
            let ack = BUFS + u64::from(i + 1) * 4096;
            mem.write_obj(0xffu8, GuestAddress(ack)).unwrap();
            let d1 = DESC + u64::from(i + 1) * 16;
            mem.write_obj(ack, GuestAddress(d1)).unwrap();
            mem.write_obj(1u32, GuestAddress(d1 + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(d1 + 12)).unwrap();
            GuestAddress(ack)
        }

        /// The used ring's avail_event (VIRTIO_RING_F_EVENT_IDX): the driver kicks when its
        /// avail index passes it.
        fn avail_event(&self) -> u16 {
            let at = USED + 4 + 8 * u64::from(QSIZE);
            self.ram.mem.read_obj(GuestAddress(at)).unwrap()
        }

        fn used(&self) -> Vec<(u32, u32)> {
            let mem = &self.ram.mem;
            let n: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
            (0..u64::from(n))
                .map(|k| {
                    let at = USED + 4 + (k % u64::from(QSIZE)) * 8;
                    (
                        mem.read_obj(GuestAddress(at)).unwrap(),
                        mem.read_obj(GuestAddress(at + 4)).unwrap(),
                    )
                })
                .collect()
        }

        fn frame(payload: &[u8]) -> Vec<u8> {
            let mut f = vec![0xff; 6];
            f.extend([0x02, 0, 0, 0, 0, 9]);
            f.extend(PROTO.to_be_bytes());
            f.extend(payload);
            f.resize(f.len().max(60), 0);
            f
        }

        fn send_to_guest(&self, payload: &[u8]) {
            let f = Rig::frame(payload);
            // SAFETY: `f` is valid for reads of its length on a bound packet socket.
            let n = unsafe { libc::send(self.sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            assert_eq!(n, f.len() as isize);
        }

        /// The next frame of ours the interface saw (what the device sent), within 5 s.
        fn sent_by_device(&self) -> Vec<u8> {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 2048];
            loop {
                // SAFETY: `buf` is valid for writes of its length.
                let n = unsafe {
                    libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n > 0 {
                    return buf[..n as usize].to_vec();
                }
                assert!(Instant::now() < deadline, "no frame from the device");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        /// Reads frames from the tap, without a receive buffer posted, until the one held for a
        /// buffer carries `payload` (a frame of someone else's is let through to a buffer).
        fn hold_frame(&mut self, payload: &[u8]) {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                self.net.receive(&mut self.queue, &self.ram.mem);
                if let Some(len) = self.net.pending {
                    let body = &self.net.rx_buf[HDR_LEN + 14..len];
                    if body.starts_with(payload) {
                        return;
                    }
                    self.post(self.avail % QSIZE, 4096, true, &[0; 1]);
                    continue;
                }
                assert!(Instant::now() < deadline, "the frame never came");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        /// Serves the queue until a used entry whose buffer holds `payload` shows, within 5 s.
        fn receive_until(&mut self, payload: &[u8]) -> (u32, u32) {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                self.net.receive(&mut self.queue, &self.ram.mem);
                for (id, len) in self.used() {
                    let mut got = vec![0u8; len as usize];
                    let at = BUFS + u64::from(id) * 4096;
                    self.ram.mem.read_slice(&mut got, GuestAddress(at)).unwrap();
                    if got.len() >= HDR_LEN + 14 + payload.len()
                        && &got[HDR_LEN + 14..HDR_LEN + 14 + payload.len()] == payload
                    {
                        return (id, len);
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "the frame never reached the guest"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn transmitted_frames_reach_the_tap_with_the_header_stripped() {
        let Some(mut r) = rig("t") else { return };
        let mut chain = vec![0xaau8; HDR_LEN]; // a driver's junk in the header: not passed on
        chain.extend(Rig::frame(b"to the host"));
        r.post(0, chain.len() as u32, false, &chain);
        assert!(r.net.transmit(&mut r.queue, &r.ram.mem));
        assert_eq!(r.used(), vec![(0, 0)]);
        assert_eq!(r.sent_by_device(), Rig::frame(b"to the host"));
        assert_eq!(r.net.counters.tx_frames, 1);
    }

    #[test]
    fn received_frames_land_in_guest_buffers_marked_dirty_and_wait_for_one() {
        let Some(mut r) = rig("r") else { return };
        // No buffer posted: the frame is held, and the tap is not polled meanwhile.
        r.send_to_guest(b"first");
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.net.pending.is_none() {
            r.net.receive(&mut r.queue, &r.ram.mem);
            assert!(Instant::now() < deadline, "the frame never came");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(r.net.backend_fd(std::slice::from_ref(&r.queue)).is_none());
        for region in r.ram.mem.iter() {
            MmapRegion::bitmap(region).reset();
        }
        for i in 0..4 {
            r.post(i, 2048, true, &[0xee; 16]);
        }
        let (id, len) = r.receive_until(b"first");
        let mut head = [0u8; HDR_LEN];
        let at = BUFS + u64::from(id) * 4096;
        r.ram.mem.read_slice(&mut head, GuestAddress(at)).unwrap();
        // No offloads: flags and GSO clear; one buffer.
        assert_eq!(head, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(len as usize, HDR_LEN + 60);
        let region = r.ram.mem.iter().next().unwrap();
        assert!(MmapRegion::bitmap(region).dirty_at(at as usize));
        assert!(r.net.backend_fd(std::slice::from_ref(&r.queue)).is_some());
    }

    #[test]
    fn a_frame_larger_than_its_buffer_is_dropped_and_counted() {
        let Some(mut r) = rig("d") else { return };
        let ours = [7u8; 200];
        r.send_to_guest(&ours);
        r.hold_frame(&ours);
        r.post(r.avail % QSIZE, 64, true, &[0; 1]);
        let dropped = r.net.counters.rx_dropped;
        assert!(r.net.receive(&mut r.queue, &r.ram.mem));
        // Our frame, and only it, was dropped; its buffer goes back to the driver empty.
        assert_eq!(r.net.counters.rx_dropped, dropped + 1);
        assert_eq!(
            r.used().last(),
            Some(&(u32::from((r.avail - 1) % QSIZE), 0))
        );
        assert!(r.net.pending.is_none());
    }

    #[test]
    fn a_frame_that_fills_the_bounce_buffer_is_dropped_as_cut_short() {
        let Some(mut r) = rig("b") else { return };
        // read(2) on a tap gives a frame longer than the buffer cut short to the buffer's
        // length, and says nothing else about it.
        let mut small = [0u8; 64];
        r.send_to_guest(&[1u8; 200]);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match r.net.tap.read(&mut small) {
                Ok(n) if small[12..14] == PROTO.to_be_bytes() => {
                    assert_eq!(n, small.len());
                    assert!(small[14..].iter().all(|&b| b == 1));
                    break;
                }
                Ok(_) => {} // someone else's frame
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
            }
            assert!(Instant::now() < deadline, "the frame never came");
            std::thread::sleep(Duration::from_millis(1));
        }
        // So with a bounce buffer shorter than a frame, the frame is dropped and counted (not
        // handed to the guest cut short), and the next one that fits comes through.
        r.net.rx_buf.truncate(HDR_LEN + 100);
        for i in 0..4 {
            r.post(i, 2048, true, &[0; 1]);
        }
        r.send_to_guest(&[2u8; 200]);
        r.send_to_guest(b"fits");
        let (id, len) = r.receive_until(b"fits");
        assert_eq!(len as usize, HDR_LEN + 60);
        assert!(r.net.counters.rx_dropped >= 1);
        assert_eq!(r.used(), vec![(id, len)], "nothing but the frame that fits");
    }

    #[test]
    fn a_receive_batch_stops_at_the_queue_size() {
        let Some(mut r) = rig("q") else { return };
        r.net.rx_buf.truncate(HDR_LEN + 100);
        let flood = 2 * usize::from(QSIZE);
        for _ in 0..flood {
            r.send_to_guest(&[3u8; 200]);
        }
        for i in 0..QSIZE {
            r.post(i, 2048, true, &[0; 1]);
        }
        // Frames dropped take no buffer, so only the cap ends a call while the tap has frames.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut capped = false;
        while r.net.counters.rx_dropped < flood as u64 {
            let before = r.net.counters.rx_dropped;
            r.net.receive(&mut r.queue, &r.ram.mem);
            let took = r.net.counters.rx_dropped - before;
            assert!(took <= u64::from(QSIZE), "one call took {took} frames");
            if took == u64::from(QSIZE) {
                assert!(r.net.has_more(), "the worker must come back for the rest");
                capped = true;
            }
            assert!(Instant::now() < deadline, "the frames never came");
        }
        assert!(capped, "no call had a full batch");
    }

    #[test]
    fn announce_shows_in_the_status_until_the_driver_acks() {
        let Some(mut r) = rig("a") else { return };
        let status = |n: &Net| {
            let mut b = [0u8; 2];
            n.read_config(6, &mut b);
            u16::from_le_bytes(b)
        };
        assert_eq!(status(&r.net), VIRTIO_NET_S_LINK_UP);
        assert!(
            !r.net.moved(VIRTIO_F_VERSION_1),
            "not negotiated: nothing to announce"
        );
        assert!(r.net.moved(VIRTIO_NET_F_GUEST_ANNOUNCE));
        assert_eq!(status(&r.net), VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE);
        let mut mac = [0u8; 6];
        r.net.read_config(0, &mut mac);
        assert_eq!(mac, [0x52, 0x54, 0, 1, 2, 3]);
        // An unknown command is refused, the ack is accepted; each writes its ack byte.
        for (i, cmd, want) in [
            (0u16, [0u8, 0u8], VIRTIO_NET_ERR),
            (
                2,
                [VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK],
                VIRTIO_NET_OK,
            ),
        ] {
            let ack = r.post_command(i, cmd);
            assert!(r.net.control(&mut r.queue, &r.ram.mem));
            assert_eq!(r.ram.mem.read_obj::<u8>(ack).unwrap(), want);
        }
        assert_eq!(status(&r.net), VIRTIO_NET_S_LINK_UP);
        r.net.moved(VIRTIO_NET_F_GUEST_ANNOUNCE);
        r.net.reset(&r.ram.mem);
        assert_eq!(
            status(&r.net),
            VIRTIO_NET_S_LINK_UP,
            "a reset clears it too"
        );
    }

    #[test]
    fn the_control_queue_rearms_kicks_under_event_idx() {
        let Some(mut r) = rig("c") else { return };
        r.queue.set_event_idx(true);
        // Two moves, two acks (Linux's second one comes after a second migration): the driver
        // kicks for a command only when its avail index passes avail_event (vring_need_event),
        // so the device must have moved avail_event past each command it served.
        for round in 0..2u16 {
            r.net.moved(VIRTIO_NET_F_GUEST_ANNOUNCE);
            let ack = r.post_command(2 * round, [VIRTIO_NET_CTRL_ANNOUNCE, 0]);
            assert!(r.net.control(&mut r.queue, &r.ram.mem));
            assert_eq!(r.ram.mem.read_obj::<u8>(ack).unwrap(), VIRTIO_NET_OK);
            assert_eq!(
                r.avail_event(),
                round + 1,
                "round {round}: kicks not re-armed"
            );
        }
    }

    #[test]
    fn a_transmit_batch_stops_at_the_queue_size_while_the_driver_refills_the_ring() {
        let Some(mut r) = rig("f") else { return };
        let mut chain = vec![0u8; HDR_LEN];
        chain.extend(Rig::frame(b"flood"));
        for i in 0..QSIZE {
            r.post(i, chain.len() as u32, false, &chain);
        }
        // A driver on another thread puts every chain the device returns straight back, so the
        // ring is never empty while the device works (up to a bound, for the test's sake).
        let stop = Arc::new(AtomicBool::new(false));
        let driver = std::thread::spawn({
            let (stop, ram, mut avail) = (stop.clone(), r.ram.clone(), r.avail);
            move || {
                let mem = &ram.mem;
                let (mut seen, mut reposted) = (0u16, 0u32);
                while !stop.load(Ordering::Relaxed) && reposted < 100_000 {
                    let used: u16 = mem.load(GuestAddress(USED + 2), Ordering::Acquire).unwrap();
                    while seen != used {
                        let at = USED + 4 + u64::from(seen % QSIZE) * 8;
                        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
                        let slot = AVAIL + 4 + u64::from(avail % QSIZE) * 2;
                        mem.write_obj(id as u16, GuestAddress(slot)).unwrap();
                        avail = avail.wrapping_add(1);
                        mem.store(avail, GuestAddress(AVAIL + 2), Ordering::Release)
                            .unwrap();
                        seen = seen.wrapping_add(1);
                        reposted += 1;
                    }
                }
            }
        });
        assert!(r.net.transmit(&mut r.queue, &r.ram.mem));
        stop.store(true, Ordering::Relaxed);
        driver.join().unwrap();
        let c = r.net.counters;
        assert_eq!(c.tx_frames + c.tx_dropped, u64::from(QSIZE), "{c:?}");
        assert!(r.net.has_more(), "the worker must come back for the rest");
    }

    #[test]
    fn link_down_and_the_announce_ack_give_new_config_generations() {
        let Some(mut r) = rig("l") else { return };
        let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
        let net = Net::new(
            Tap::from_fd(r.net.tap.as_raw_fd()).unwrap(),
            [2, 0, 0, 0, 0, 1],
        );
        let msix = Msix::new((0..4).map(|_| evt()).collect(), None, 24);
        let kicks = (0..3).map(|_| evt()).collect();
        let mut dev = VirtioPci::new(
            Box::new(net),
            0xc000_0000,
            msix,
            kicks,
            evt(),
            r.ram.clone(),
        );
        let write = |dev: &mut VirtioPci, off: u64, len: usize, value: u64| {
            dev.write_bar(0, off, &value.to_le_bytes()[..len])
        };
        let read = |dev: &mut VirtioPci, off: u64, len: usize| {
            let mut b = [0u8; 8];
            dev.read_bar(0, off, &mut b[..len]);
            u64::from_le_bytes(b)
        };
        // A driver's set-up (§3.1.1): features, the receive queue (rings past the rig's) and the
        // control queue (the rig's rings, which post_command fills), a config vector, DRIVER_OK.
        let features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_CTRL_VQ;
        let features = features | VIRTIO_NET_F_GUEST_ANNOUNCE;
        write(&mut dev, 0x14, 1, 1);
        write(&mut dev, 0x14, 1, 3);
        for (select, half) in [(0, features & 0xffff_ffff), (1, features >> 32)] {
            write(&mut dev, 0x08, 4, select);
            write(&mut dev, 0x0c, 4, half);
        }
        write(&mut dev, 0x14, 1, 3 | u64::from(STATUS_FEATURES_OK));
        for (queue, rings) in [(RX, 0x13000u64), (CTRL, DESC)] {
            write(&mut dev, 0x16, 2, queue as u64);
            write(&mut dev, 0x18, 2, u64::from(QSIZE));
            for (i, off) in [0x20, 0x28, 0x30].into_iter().enumerate() {
                write(&mut dev, off, 4, rings + 0x1000 * i as u64);
                write(&mut dev, off + 4, 4, 0);
            }
            write(&mut dev, 0x1c, 2, 1);
        }
        write(&mut dev, 0x10, 2, 3);
        write(
            &mut dev,
            0x14,
            1,
            3 | u64::from(STATUS_FEATURES_OK | STATUS_DRIVER_OK),
        );
        let status = |dev: &mut VirtioPci| read(dev, DEVICE_OFFSET + 6, 2) as u16;
        let generation = |dev: &mut VirtioPci| read(dev, 0x15, 1);
        dev.process_queues();
        assert_eq!(generation(&mut dev), 0);
        // A move: the announce bit, a new generation, a config interrupt.
        dev.moved();
        assert_eq!(
            status(&mut dev),
            VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE
        );
        assert_eq!(generation(&mut dev), 1);
        assert_eq!(read(&mut dev, ISR_OFFSET, 1) & 2, 2);
        // The driver's ack clears it: a new generation (a driver reading the config across it
        // must see it change), no config interrupt.
        r.post_command(0, [VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK]);
        dev.process_queues();
        assert_eq!(status(&mut dev), VIRTIO_NET_S_LINK_UP);
        assert_eq!(generation(&mut dev), 2);
        assert_eq!(read(&mut dev, ISR_OFFSET, 1) & 2, 0);
        // The tap's interface goes away: link down, a new generation and a config interrupt.
        let del = std::process::Command::new("ip")
            .args(["link", "del", &r.name])
            .status();
        if !del.is_ok_and(|s| s.success()) {
            eprintln!("skipped the link-down half: needs iproute2's ip to delete the tap");
            return;
        }
        dev.process_queues();
        assert_eq!(status(&mut dev), 0);
        assert_eq!(generation(&mut dev), 3);
        assert_eq!(read(&mut dev, ISR_OFFSET, 1) & 2, 2);
        dev.process_queues();
        assert_eq!(generation(&mut dev), 3, "one change, one generation");
    }
}
