//! The virtio-pci transport and virtio-blk driven the way a guest driver drives them: config space
//! through `PciFunction`, BAR0 registers, split rings written into real guest memory (memfd-backed
//! `GuestRam`), requests against a real image file.

use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::block::*;
use super::disk_image::DiskImage;
use super::msix::Msix;
use super::pci::*;
use super::worker::Worker;
use super::*;
use crate::devices::pci::PciFunction;
use crate::memory::GuestRam;

const BAR0: u64 = 0xc000_0000;
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const HEADER: u64 = 0x20000;
const DATA: u64 = 0x40000;
const STATUS: u64 = 0x30000;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct Image(PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

struct Harness {
    dev: VirtioPci,
    ram: Arc<GuestRam>,
    kicks: Vec<EventFd>,
    irqs: Vec<EventFd>,
    avail_idx: u16,
    _image: Image,
}

fn image(name: &str, sectors: u64) -> Image {
    let path = std::env::temp_dir().join(format!("vmmpy-blk-{}-{name}", std::process::id()));
    let bytes: Vec<u8> = (0..sectors * 512)
        .map(|i| (i / 512) as u8 ^ (i % 251) as u8)
        .collect();
    fs::write(&path, bytes).unwrap();
    Image(path)
}

fn harness(name: &str, readonly: bool) -> Harness {
    harness_with(name, readonly, false)
}

fn harness_with(name: &str, readonly: bool, direct: bool) -> Harness {
    let img = image(name, 64);
    let disk = DiskImage::open(img.0.to_str().unwrap(), readonly, direct).unwrap();
    harness_of(Box::new(Block::new(disk, "disk-serial-0")), img)
}

fn harness_of(device: Box<dyn VirtioDevice>, img: Image) -> Harness {
    let ram = GuestRam::with_ranges(&[(0, 4 << 20)]).unwrap();
    let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
    let kicks = vec![evt()];
    let irqs = vec![evt(), evt()];
    let msix = Msix::new(
        irqs.iter().map(|e| e.try_clone().unwrap()).collect(),
        None,
        24,
    );
    let dev_kicks = kicks.iter().map(|e| e.try_clone().unwrap()).collect();
    let dev = VirtioPci::new(device, BAR0, msix, dev_kicks, evt(), ram.clone());
    Harness {
        dev,
        ram,
        kicks,
        irqs,
        avail_idx: 0,
        _image: img,
    }
}

impl Harness {
    fn read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn write(&mut self, off: u64, len: usize, value: u64) {
        self.dev.write_bar(0, off, &value.to_le_bytes()[..len]);
    }

    fn status(&mut self) -> u8 {
        self.read(0x14, 1) as u8
    }

    /// Feature negotiation as §3.1.1 has it; returns the status read back after FEATURES_OK.
    fn negotiate(&mut self, features: u64) -> u8 {
        self.write(0x14, 1, 0);
        self.write(0x14, 1, 1);
        self.write(0x14, 1, 3);
        self.write(0x08, 4, 0);
        self.write(0x0c, 4, features & 0xffff_ffff);
        self.write(0x08, 4, 1);
        self.write(0x0c, 4, features >> 32);
        self.write(0x14, 1, 3 | u64::from(STATUS_FEATURES_OK));
        self.status()
    }

    fn setup(&mut self) {
        assert_ne!(
            self.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH) & STATUS_FEATURES_OK,
            0
        );
        self.write(0x16, 2, 0);
        assert_eq!(
            self.read(0x18, 2),
            256,
            "queue size reads its maximum after reset"
        );
        self.write(0x18, 2, u64::from(QSIZE));
        for (off, addr) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
            self.write(off, 4, addr & 0xffff_ffff);
            self.write(off + 4, 4, addr >> 32);
        }
        self.write(0x1a, 2, 0);
        self.write(0x1c, 2, 1);
        assert_eq!(self.read(0x1c, 2), 1);
        self.write(
            0x14,
            1,
            u64::from(3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
        );
    }

    /// Puts a chain of (address, length, device-writable) at descriptors 0.., makes it available,
    /// lets the device serve the queue; returns the used element (id, len).
    fn submit(&mut self, chain: &[(u64, u32, bool)]) -> (u32, u32) {
        self.publish(chain);
        self.serve();
        self.last_used()
    }

    /// Lets the device take what is available, then waits (generously) until it answered all.
    fn serve(&mut self) {
        self.dev.process_queues();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.dev.complete_queues() > 0 {
            assert!(Instant::now() < deadline, "requests still in flight");
            std::thread::yield_now();
        }
    }

    fn used_idx(&self) -> u16 {
        self.ram.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn last_used(&self) -> (u32, u32) {
        let mem = &self.ram.mem;
        let used_idx = self.used_idx();
        assert_eq!(used_idx, self.avail_idx, "the request was completed");
        let elem = USED + 4 + 8 * u64::from(used_idx.wrapping_sub(1) % QSIZE);
        (
            mem.read_obj(GuestAddress(elem)).unwrap(),
            mem.read_obj(GuestAddress(elem + 4)).unwrap(),
        )
    }

    /// Makes a chain available without telling the device.
    fn publish(&mut self, chain: &[(u64, u32, bool)]) {
        self.publish_at(0, chain);
    }

    /// Makes a chain at descriptors `first..` available without telling the device.
    fn publish_at(&mut self, first: u16, chain: &[(u64, u32, bool)]) {
        let mem = &self.ram.mem;
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let index = first + i as u16;
            let d = DESC + 16 * u64::from(index);
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(index + 1, GuestAddress(d + 14)).unwrap();
        }
        let slot = self.avail_idx % QSIZE;
        mem.write_obj(first, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// A request without data, made available but not served.
    fn request_publish(&mut self, kind: u32) {
        let mem = &self.ram.mem;
        mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        self.publish(&[(HEADER, 16, false), (STATUS, 1, true)]);
    }

    fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
        let mem = &self.ram.mem;
        mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut chain = vec![(HEADER, 16, false)];
        if let Some((len, write)) = data {
            chain.push((DATA, len, write));
        }
        chain.push((STATUS, 1, true));
        let (_, len) = self.submit(&chain);
        (self.ram.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    /// Read `r` of several in flight at once: 4 KiB of sector 8 * r + 1 into its own buffer,
    /// descriptors 3r.. (head 3r), header and status of its own.
    fn publish_read(&mut self, r: u16) {
        let (header, status) = (HEADER + 16 * u64::from(r), STATUS + u64::from(r));
        let mem = &self.ram.mem;
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(header))
            .unwrap();
        mem.write_obj(8 * u64::from(r) + 1, GuestAddress(header + 8))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        self.publish_at(
            3 * r,
            &[
                (header, 16, false),
                (read_buffer(r), 4096, true),
                (status, 1, true),
            ],
        );
    }

    /// Read `r`'s buffer holds what the file has at its sectors, and its status says OK.
    fn check_read(&self, r: u16, file: &[u8]) {
        let mem = &self.ram.mem;
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(read_buffer(r)))
            .unwrap();
        let at = (8 * usize::from(r) + 1) * 512;
        assert_eq!(got, file[at..at + 4096], "read {r}'s data");
        let status: u8 = mem.read_obj(GuestAddress(STATUS + u64::from(r))).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK, "read {r}'s status");
        assert!(self.vmm_dirty(read_buffer(r)), "read {r}'s buffer is dirty");
    }

    fn file(&self) -> Vec<u8> {
        fs::read(&self._image.0).unwrap()
    }

    fn vmm_dirty(&self, addr: u64) -> bool {
        let region = self.ram.mem.iter().next().unwrap();
        MmapRegion::bitmap(region).dirty_at(addr as usize)
    }

    fn clear_dirty(&self) {
        for region in self.ram.mem.iter() {
            MmapRegion::bitmap(region).reset();
        }
    }
}

/// Where read `r` of `publish_read` lands (page-aligned, as O_DIRECT wants).
fn read_buffer(r: u16) -> u64 {
    DATA + 0x10000 + 4096 * u64::from(r)
}

#[test]
fn config_space_identity_and_capabilities() {
    let mut h = harness("caps", false);
    let c = |h: &mut Harness, reg: usize| h.dev.read_config(reg);
    assert_eq!(c(&mut h, 0), 0x1042_1af4);
    assert_eq!(c(&mut h, 2) & 0xff, 1, "revision 1: modern only");
    assert_eq!(
        c(&mut h, 11),
        0x0002_1af4,
        "subsystem: virtio vendor, type 2"
    );
    assert_eq!(c(&mut h, 4), BAR0 as u32 | 0b100);
    assert_ne!(c(&mut h, 1) & (1 << 20), 0, "capability list");
    // Walk the list: MSI-X, then common, ISR, device, notify, pci-cfg.
    let mut ptr = (c(&mut h, 0x34 / 4) & 0xfc) as usize;
    let mut found = Vec::new();
    while ptr != 0 {
        let head = c(&mut h, ptr / 4);
        let (id, next) = (head & 0xff, (head >> 8 & 0xfc) as usize);
        if id == 0x09 {
            let cfg_type = (head >> 24) as u8;
            let bar = c(&mut h, ptr / 4 + 1) & 0xff;
            let (offset, length) = (c(&mut h, ptr / 4 + 2), c(&mut h, ptr / 4 + 3));
            found.push((cfg_type, bar, offset, length));
            if cfg_type == 2 {
                assert_eq!(c(&mut h, ptr / 4 + 4), 4, "notify_off_multiplier");
            }
        } else {
            assert_eq!(id, 0x11);
            assert_eq!(head >> 16 & 0x7ff, 1, "two vectors");
            assert_eq!(c(&mut h, ptr / 4 + 1), 0x4000, "table at 0x4000, BIR 0");
            assert_eq!(c(&mut h, ptr / 4 + 2), 0x5000, "PBA at 0x5000, BIR 0");
        }
        ptr = next;
    }
    assert_eq!(
        found,
        vec![
            (1, 0, 0, 0x38),
            (3, 0, 0x1000, 1),
            (4, 0, 0x2000, 0x3c),
            (2, 0, 0x3000, 4),
            (5, 0, 0, 0)
        ]
    );
}

#[test]
fn features_ok_stays_clear_without_version_1() {
    let mut h = harness("features", false);
    h.write(0x00, 4, 1);
    assert_eq!(h.read(0x04, 4), 1, "VERSION_1 is bit 32");
    h.write(0x00, 4, 0);
    let low = h.read(0x04, 4);
    assert_ne!(low & VIRTIO_BLK_F_FLUSH, 0);
    assert_eq!(low & VIRTIO_BLK_F_RO, 0);
    assert_eq!(
        h.negotiate(VIRTIO_BLK_F_FLUSH) & STATUS_FEATURES_OK,
        0,
        "refused without VERSION_1"
    );
    assert_ne!(h.negotiate(VIRTIO_F_VERSION_1) & STATUS_FEATURES_OK, 0);
    // Features the device does not offer are not taken.
    h.negotiate(VIRTIO_F_VERSION_1 | 1 << 40);
    h.write(0x08, 4, 1);
    assert_eq!(h.read(0x0c, 4), 1);
}

#[test]
fn device_config_and_queue_setup() {
    let mut h = harness("config", true);
    assert_eq!(h.read(0x2000, 8), 64, "capacity in sectors");
    assert_eq!(h.read(0x2000 + 12, 4), u64::from(SEG_MAX));
    assert_eq!(h.read(0x2000 + 20, 4), 512);
    assert_ne!(
        h.read(0x04, 4) & VIRTIO_BLK_F_RO,
        0,
        "read-only disks offer RO"
    );
    assert_eq!(h.read(0x12, 2), 1, "one queue");
    h.setup();
    assert_eq!(h.read(0x20, 4), DESC);
    // Enabled queues take no new addresses; a non-power-of-two size is refused.
    h.write(0x20, 4, 0x5000);
    assert_eq!(h.read(0x20, 4), DESC);
    h.write(0x14, 1, 0);
    assert_eq!(h.status(), 0);
    assert_eq!(h.read(0x1c, 2), 0, "reset disables the queue");
    assert_eq!(h.read(0x1a, 2), u64::from(NO_VECTOR));
    h.write(0x18, 2, 100);
    assert_eq!(h.read(0x18, 2), 256);
}

#[test]
fn reads_writes_flush_and_get_id() {
    let mut h = harness("rw", false);
    h.setup();
    let before = h.file();
    let (status, len) = h.request(VIRTIO_BLK_T_IN, 3, Some((1024, true)));
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1025));
    let mut got = vec![0u8; 1024];
    h.ram.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, before[3 * 512..5 * 512]);

    let pattern: Vec<u8> = (0..512).map(|i| (i * 7) as u8).collect();
    h.ram.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 10, Some((512, false))),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(h.file()[10 * 512..11 * 512], pattern[..]);
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, None), (VIRTIO_BLK_S_OK, 1));

    let (status, len) = h.request(VIRTIO_BLK_T_GET_ID, 0, Some((20, true)));
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 20];
    h.ram.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..13], b"disk-serial-0");
    assert_eq!(id[13..], [0; 7]);

    assert_eq!(h.request(99, 0, None).0, VIRTIO_BLK_S_UNSUPP);
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 63, Some((1024, true))).0,
        VIRTIO_BLK_S_IOERR,
        "past the end"
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 0, Some((100, true))).0,
        VIRTIO_BLK_S_IOERR,
        "not whole sectors"
    );
    // The driver asked for vector 0, which MSI-X (off) holds pending; nothing was sent.
    assert!(h.irqs[0].read().is_err());
    assert!(h.kicks[0].read().is_err(), "nothing kicked the queue");
}

#[test]
fn header_split_across_descriptors() {
    let mut h = harness("split", false);
    h.setup();
    let mem = &h.ram.mem;
    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADER))
        .unwrap();
    mem.write_obj(2u64, GuestAddress(HEADER + 0x100 + 4))
        .unwrap();
    let (_, len) = h.submit(&[
        (HEADER, 4, false),
        (HEADER + 0x100, 12, false),
        (DATA, 512, true),
        (DATA + 512, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(len, 1025);
    assert_eq!(
        h.ram.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let mut got = vec![0u8; 1024];
    h.ram.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, h.file()[2 * 512..4 * 512]);
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_its_file() {
    let mut h = harness("ro", true);
    h.setup();
    let before = h.file();
    h.ram
        .mem
        .write_slice(&[0xaa; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, Some((512, false))).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(h.file(), before);
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 0, Some((512, true))).0,
        VIRTIO_BLK_S_OK
    );
}

#[test]
fn device_writes_are_marked_in_the_vmm_dirty_bitmap() {
    let mut h = harness("dirty", false);
    h.setup();
    h.clear_dirty();
    assert!(!h.vmm_dirty(DATA) && !h.vmm_dirty(USED) && !h.vmm_dirty(STATUS));
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 1, Some((8192, true))).0,
        VIRTIO_BLK_S_OK
    );
    // The data pages (written by pread behind vm-memory's back), the status byte and the used
    // ring each lie on their own pages.
    assert!(
        h.vmm_dirty(DATA) && h.vmm_dirty(DATA + 4096),
        "read data is dirty"
    );
    assert!(h.vmm_dirty(STATUS), "status byte is dirty");
    assert!(h.vmm_dirty(USED), "used ring is dirty");
    assert!(!h.vmm_dirty(DATA + 8192), "only what was written");
}

#[test]
fn msix_vectors_fire_once_enabled_and_unmasked() {
    let mut h = harness("msix", false);
    h.setup();
    // Enable MSI-X in the capability (message control bit 15 of the capability at 0x40).
    h.dev.write_config(0x40 / 4, 2, &0x8000u16.to_le_bytes());
    h.write(0x4000, 4, 0xfee0_0000);
    h.write(0x4008, 4, 0x30);
    h.write(0x400c, 4, 0);
    h.request(VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!(h.irqs[0].read().unwrap(), 1, "queue 0's vector fired");
    assert_eq!(h.read(0x1000, 1), 1, "ISR bit 0, cleared by the read");
    assert_eq!(h.read(0x1000, 1), 0);
    // A polling driver asks for no interrupts (VRING_AVAIL_F_NO_INTERRUPT, without EVENT_IDX).
    h.ram.mem.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
    h.request(VIRTIO_BLK_T_FLUSH, 0, None);
    assert!(h.irqs[0].read().is_err(), "no interrupt asked for");
    h.ram.mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    h.request(VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!(h.irqs[0].read().unwrap(), 1, "and one again once it asks");
}

#[test]
fn pci_cfg_access_window_reaches_bar0() {
    let mut h = harness("cfgwin", false);
    let cap = 0x90 / 4;
    assert_eq!(
        h.dev.read_config(cap) >> 24,
        5,
        "the pci-cfg capability is at 0x90"
    );
    h.dev.write_config(cap + 1, 0, &[0]);
    h.dev.write_config(cap + 2, 0, &0x2000u32.to_le_bytes());
    h.dev.write_config(cap + 3, 0, &4u32.to_le_bytes());
    assert_eq!(
        h.dev.read_config(cap + 4),
        64,
        "capacity's low dword through the window"
    );
}

#[test]
fn state_round_trip_continues_from_saved_indices() {
    let mut h = harness("state", false);
    h.setup();
    h.request(VIRTIO_BLK_T_FLUSH, 0, None);
    let st = h.dev.save();
    assert_eq!(st.queues[0].next_avail, 1);
    assert_eq!(st.queues[0].next_used, 1);
    assert_eq!(
        st.transport.driver_features,
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH
    );
    // A fresh device on the same memory and image takes the state and serves the next request.
    let disk = DiskImage::open(h._image.0.to_str().unwrap(), false, false).unwrap();
    let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
    let msix = Msix::new(vec![evt(), evt()], None, 24);
    let mut fresh = VirtioPci::new(
        Box::new(Block::new(disk, "x")),
        BAR0,
        msix,
        vec![evt()],
        evt(),
        h.ram.clone(),
    );
    fresh.restore(&st).unwrap();
    assert_eq!(fresh.save(), st);
    h.dev = fresh;
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, None), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(h.dev.save().queues[0].next_used, 2);
    // State that names features the device does not offer is refused.
    let mut bad = st.clone();
    bad.transport.driver_features |= 1 << 40;
    assert!(h.dev.restore(&bad).is_err());
}

/// Waits (generously: the machine may be busy) until the device completed `want` requests or more.
fn wait_used(ram: &GuestRam, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ram.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() < want {
        assert!(
            Instant::now() < deadline,
            "the device thread did not complete request {want}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn a_guest_kick_reaches_the_worker_through_kvm_without_an_exit() {
    use kvm_ioctls::{IoEventAddress, NoDatamatch, VcpuExit};

    let mut h = harness("kick", false);
    let Some((_kvm, vm, mut vcpu)) = crate::fixtures::tiny_vm(&h.ram, false) else {
        return;
    };
    h.setup();
    let notify = VirtioPci::notify_address(BAR0, 0);
    vm.register_ioevent(&h.kicks[0], &IoEventAddress::Mmio(notify), NoDatamatch)
        .unwrap();
    // CPL3 at 0x2000: `L: mov edi, notify ; mov word [rdi], 0 (the queue index) ; out 0x3f8 ; jmp L`.
    let mut code: Vec<u8> = vec![0xbf];
    code.extend((notify as u32).to_le_bytes());
    code.extend([0x66, 0xc7, 0x07, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0xee]);
    let back = -(code.len() as i64 + 2) as i8;
    code.extend([0xeb, back as u8]);
    h.ram.mem.write_slice(&code, GuestAddress(0x2000)).unwrap();

    h.request_publish(VIRTIO_BLK_T_FLUSH);
    let Harness {
        dev,
        ram,
        kicks,
        _image,
        ..
    } = h;
    let dev_kicks = vec![kicks[0].try_clone().unwrap()];
    let dev = Arc::new(Mutex::new(dev));
    let mut worker = Worker::spawn(
        "virtio-test".into(),
        dev,
        dev_kicks,
        EventFd::new(EFD_NONBLOCK).unwrap(),
        true,
    )
    .unwrap();
    worker
        .pause(Instant::now() + Duration::from_secs(30))
        .unwrap();

    // The store to the notify register does not exit: the next exit is the `out`.
    match vcpu.run().unwrap() {
        VcpuExit::IoOut(0x3f8, _) => {}
        other => panic!("the kick exited to userspace: {other:?}"),
    }
    let run_once = |vcpu: &mut kvm_ioctls::VcpuFd| match vcpu.run().unwrap() {
        VcpuExit::IoOut(0x3f8, _) => {}
        other => panic!("unexpected exit {other:?}"),
    };
    run_once(&mut vcpu); // one more kick
                         // A paused worker serves nothing, however often it is kicked.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        ram.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(),
        0,
        "paused: nothing served"
    );
    worker.resume();
    wait_used(&ram, 1);
    assert_eq!(
        ram.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    worker.stop();
}

#[test]
fn direct_io_through_unaligned_guest_buffers() {
    let mut h = harness_with("direct", false, true);
    h.setup();
    h.clear_dirty();
    let before = h.file();
    // Data at DATA + 512: not aligned for O_DIRECT; the bounce buffer is.
    let mem = &h.ram.mem;
    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADER))
        .unwrap();
    mem.write_obj(5u64, GuestAddress(HEADER + 8)).unwrap();
    let (_, len) = h.submit(&[
        (HEADER, 16, false),
        (DATA + 512, 1024, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(len, 1025);
    assert_eq!(
        h.ram.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let mut got = vec![0u8; 1024];
    h.ram
        .mem
        .read_slice(&mut got, GuestAddress(DATA + 512))
        .unwrap();
    assert_eq!(got, before[5 * 512..7 * 512]);
    assert!(h.vmm_dirty(DATA), "bounced read data is dirty too");

    let pattern: Vec<u8> = (0..1024).map(|i| (i * 13 + 1) as u8).collect();
    h.ram
        .mem
        .write_slice(&pattern, GuestAddress(DATA + 512))
        .unwrap();
    let mem = &h.ram.mem;
    mem.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(HEADER))
        .unwrap();
    mem.write_obj(8u64, GuestAddress(HEADER + 8)).unwrap();
    h.submit(&[
        (HEADER, 16, false),
        (DATA + 512, 1024, false),
        (STATUS, 1, true),
    ]);
    assert_eq!(
        h.ram.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(h.file()[8 * 512..10 * 512], pattern[..]);
}

/// A DISCARD or WRITE_ZEROES request for one range.
fn zero_request(h: &mut Harness, kind: u32, sector: u64, count: u32, flags: u32) -> u8 {
    let mem = &h.ram.mem;
    mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
    mem.write_obj(sector, GuestAddress(DATA)).unwrap();
    mem.write_obj(count, GuestAddress(DATA + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(DATA + 12)).unwrap();
    h.submit(&[(HEADER, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
    h.ram.mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn discard_and_write_zeroes() {
    let mut h = harness("zeroes", false);
    assert_ne!(
        h.read(0x04, 4) & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );
    assert_eq!(h.read(0x2000 + 36, 4), u64::from(MAX_ZERO_SECTORS));
    assert_eq!(h.read(0x2000 + 40, 4), 1, "one range per request");
    h.setup();
    let before = h.file();
    assert_eq!(
        zero_request(&mut h, VIRTIO_BLK_T_WRITE_ZEROES, 2, 3, 0),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        zero_request(&mut h, VIRTIO_BLK_T_WRITE_ZEROES, 8, 8, 1),
        VIRTIO_BLK_S_OK,
        "with unmap"
    );
    assert_eq!(
        zero_request(&mut h, VIRTIO_BLK_T_DISCARD, 24, 8, 0),
        VIRTIO_BLK_S_OK
    );
    let after = h.file();
    assert_eq!(after.len(), before.len(), "the image keeps its size");
    assert!(after[2 * 512..5 * 512].iter().all(|&b| b == 0));
    assert!(after[8 * 512..16 * 512].iter().all(|&b| b == 0));
    assert_eq!(
        after[..2 * 512],
        before[..2 * 512],
        "sectors around the range are untouched"
    );
    assert_eq!(after[5 * 512..8 * 512], before[5 * 512..8 * 512]);
    assert_eq!(after[16 * 512..24 * 512], before[16 * 512..24 * 512]);
    assert_eq!(after[32 * 512..], before[32 * 512..]);
    assert_eq!(
        zero_request(&mut h, VIRTIO_BLK_T_DISCARD, 0, 1, 1),
        VIRTIO_BLK_S_UNSUPP,
        "discard takes no flags"
    );
    assert_eq!(
        zero_request(&mut h, VIRTIO_BLK_T_WRITE_ZEROES, 60, 8, 0),
        VIRTIO_BLK_S_IOERR,
        "past the end"
    );
}

#[test]
fn read_only_disks_offer_no_discard_and_refuse_it() {
    let mut h = harness("zeroes-ro", true);
    assert_eq!(
        h.read(0x04, 4) & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );
    h.setup();
    let before = h.file();
    assert_eq!(
        zero_request(&mut h, VIRTIO_BLK_T_WRITE_ZEROES, 0, 4, 0),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        zero_request(&mut h, VIRTIO_BLK_T_DISCARD, 0, 4, 0),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(h.file(), before);
}

#[test]
fn indirect_descriptor_tables() {
    const F_INDIRECT: u16 = 4;
    const TABLE: u64 = 0x50000;
    let mut h = harness("indirect", false);
    assert_ne!(h.read(0x04, 4) & VIRTIO_F_RING_INDIRECT_DESC, 0);
    h.setup();
    let mem = &h.ram.mem;
    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADER))
        .unwrap();
    mem.write_obj(4u64, GuestAddress(HEADER + 8)).unwrap();
    for (i, (addr, len, flags)) in [
        (HEADER, 16u32, F_NEXT),
        (DATA, 512, F_WRITE | F_NEXT),
        (STATUS, 1, F_WRITE),
    ]
    .into_iter()
    .enumerate()
    {
        let d = TABLE + 16 * i as u64;
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        mem.write_obj(i as u16 + 1, GuestAddress(d + 14)).unwrap();
    }
    // One ring descriptor pointing at the 3-entry table.
    mem.write_obj(TABLE, GuestAddress(DESC)).unwrap();
    mem.write_obj(48u32, GuestAddress(DESC + 8)).unwrap();
    mem.write_obj(F_INDIRECT, GuestAddress(DESC + 12)).unwrap();
    mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    h.avail_idx = 1;
    h.serve();
    assert_eq!(h.last_used(), (0, 513));
    assert_eq!(
        h.ram.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let mut got = vec![0u8; 512];
    h.ram.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, h.file()[4 * 512..5 * 512]);
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let mut h = harness("eventidx", false);
    assert_ne!(
        h.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX) & STATUS_FEATURES_OK,
        0
    );
    h.write(0x16, 2, 0);
    h.write(0x18, 2, u64::from(QSIZE));
    for (off, addr) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
        h.write(off, 4, addr);
        h.write(off + 4, 4, 0);
    }
    h.write(0x1a, 2, 0);
    h.write(0x1c, 2, 1);
    h.write(
        0x14,
        1,
        u64::from(3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
    );
    h.dev.write_config(0x40 / 4, 2, &0x8000u16.to_le_bytes());
    h.write(0x4000, 4, 0xfee0_0000);
    h.write(0x400c, 4, 0);
    // used_event (the avail ring's last field): interrupt once the device passes used index 2.
    let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
    h.ram.mem.write_obj(2u16, used_event).unwrap();
    h.request(VIRTIO_BLK_T_FLUSH, 0, None);
    h.request(VIRTIO_BLK_T_FLUSH, 0, None);
    assert!(
        h.irqs[0].read().is_err(),
        "no interrupt before used_event is passed"
    );
    h.request(VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!(
        h.irqs[0].read().unwrap(),
        1,
        "the third completion crosses used_event"
    );
    // The device publishes avail_event (the used ring's last field) for the driver's kicks.
    let avail_event: u16 = h
        .ram
        .mem
        .read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(avail_event, 3);
}

#[test]
fn reads_go_to_storage_together_and_each_is_answered() {
    for direct in [false, true] {
        let mut h = harness_with("together", false, direct);
        h.setup();
        h.clear_dirty();
        let file = h.file();
        for r in 0..4 {
            h.publish_read(r);
        }
        h.dev.process_queues();
        let st = h.dev.save();
        assert_eq!(st.queues[0].next_avail, 4, "all four taken at once");
        assert_eq!(
            h.used_idx(),
            0,
            "none answered before its completion is reaped"
        );
        h.serve();
        assert_eq!(h.used_idx(), 4);
        let mut heads = Vec::new();
        for i in 0..4u64 {
            let elem = USED + 4 + 8 * i;
            let id: u32 = h.ram.mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = h.ram.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            assert_eq!(len, 4097, "data and status written");
            heads.push(id);
        }
        heads.sort();
        assert_eq!(heads, vec![0, 3, 6, 9], "each request answered once");
        for r in 0..4 {
            h.check_read(r, &file);
        }
        assert!(h.vmm_dirty(USED), "used ring is dirty");
    }
}

#[test]
fn a_reset_waits_for_the_requests_in_flight_and_answers_none() {
    let mut h = harness("reset-inflight", false);
    h.setup();
    h.clear_dirty();
    let file = h.file();
    for r in 0..4 {
        h.publish_read(r);
    }
    h.dev.process_queues();
    h.write(0x14, 1, 0);
    assert_eq!(h.dev.complete_queues(), 0, "nothing left in flight");
    assert_eq!(h.used_idx(), 0, "a reset device writes no used entries");
    for r in 0..4 {
        let mut got = vec![0u8; 4096];
        h.ram
            .mem
            .read_slice(&mut got, GuestAddress(read_buffer(r)))
            .unwrap();
        let at = (8 * usize::from(r) + 1) * 512;
        assert_eq!(got, file[at..at + 4096], "read {r} landed");
        assert!(h.vmm_dirty(read_buffer(r)), "and is marked dirty");
    }
}

#[test]
fn a_pause_answers_every_request_in_flight_first() {
    let mut h = harness("pause-inflight", false);
    h.setup();
    h.clear_dirty();
    let file = h.file();
    for r in 0..4 {
        h.publish_read(r);
    }
    let dev_kicks = vec![h.kicks[0].try_clone().unwrap()];
    let Harness {
        dev,
        ram,
        kicks,
        irqs,
        avail_idx,
        _image,
    } = h;
    let dev = Arc::new(Mutex::new(dev));
    let mut worker = Worker::spawn(
        "virtio-test".into(),
        dev.clone(),
        dev_kicks,
        EventFd::new(EFD_NONBLOCK).unwrap(),
        false,
    )
    .unwrap();
    kicks[0].write(1).unwrap();
    // Once one is answered, the worker took all four (it takes what is available at once).
    wait_used(&ram, 1);
    worker
        .pause(Instant::now() + Duration::from_secs(30))
        .unwrap();
    let used: u16 = ram.mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 4, "paused with every request answered");
    worker.stop();
    let h = Harness {
        dev: Arc::into_inner(dev).unwrap().into_inner().unwrap(),
        ram,
        kicks,
        irqs,
        avail_idx,
        _image,
    };
    for r in 0..4 {
        h.check_read(r, &file);
    }
}

#[test]
fn notifications_stay_off_while_the_worker_polls_and_come_back_before_it_sleeps() {
    let mut h = harness("poll", false);
    h.setup();
    let flags = |h: &Harness| h.ram.mem.read_obj::<u16>(GuestAddress(USED)).unwrap();
    h.publish_read(0);
    assert!(h.dev.poll_queues(), "the read was taken");
    assert_eq!(flags(&h) & 1, 1, "VRING_USED_F_NO_NOTIFY while polling");
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.used_idx() == 0 {
        assert!(Instant::now() < deadline, "the read was not answered");
        h.dev.poll_queues();
        assert_eq!(flags(&h) & 1, 1, "still off when the answer is written");
    }
    assert!(!h.dev.poll_queues(), "nothing more to do");
    h.dev.process_queues();
    assert_eq!(flags(&h) & 1, 0, "on again before the worker sleeps");
}

/// A device that takes nothing and leaves its queue's notifications to the driver's defaults, as
/// vsock's rx and event queues do (they wait for the driver's kick when it adds buffers).
struct Untouched;

impl VirtioDevice for Untouched {
    fn device_type(&self) -> u16 {
        19
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn config_len(&self) -> usize {
        0
    }
    fn read_config(&self, _offset: usize, _data: &mut [u8]) {}
    fn process_queue(&mut self, _: usize, _: &mut Queue, _: &GuestMem, _: bool) -> bool {
        false
    }
}

#[test]
fn the_transport_leaves_notifications_to_a_device_without_requests_in_flight() {
    let mut h = harness_of(Box::new(Untouched), image("untouched", 1));
    h.setup();
    h.publish_read(0);
    h.dev.process_queues();
    assert!(!h.dev.poll_queues(), "nothing was taken");
    let flags: u16 = h.ram.mem.read_obj(GuestAddress(USED)).unwrap();
    assert_eq!(flags & 1, 0, "the driver is still asked to kick");
}
