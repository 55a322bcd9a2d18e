//! virtio-blk (virtio 1.2 §5.2) over a raw image: one request queue; IN, OUT, FLUSH, GET_ID, and
//! for writable disks DISCARD (a punched hole) and WRITE_ZEROES; anything else answered
//! VIRTIO_BLK_S_UNSUPP; writes of any kind to a read-only disk VIRTIO_BLK_S_IOERR.
//! Reads and writes go to the image through the device's io_uring (`IoRing`), as many in flight
//! as the queue holds, and complete in whatever order storage finishes them; flushes are
//! fdatasyncs on the same ring. Everything else is served at once on the worker thread, and so is
//! all I/O where the host refuses io_uring, or a direct-I/O disk meets a misaligned guest buffer.

use std::os::fd::AsRawFd;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::disk_image::{DiskImage, SECTOR_SIZE};
use super::io_ring::IoRing;
use super::{
    VirtioDevice, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMem;

pub const DEVICE_TYPE: u16 = 2;
pub const QUEUE_SIZE: u16 = 256;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
/// Sectors per DISCARD / WRITE_ZEROES range (1 GiB), and one range per request.
pub const MAX_ZERO_SECTORS: u32 = 1 << 21;
const RANGE_LEN: u64 = 16;
const RANGE_FLAG_UNMAP: u32 = 1;
/// Data segments per request: the queue size less the header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
pub const ID_BYTES: usize = 20;
const CONFIG_LEN: usize = 0x3c;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
const HEADER_LEN: u64 = 16;
/// How long the worker keeps looking at an idle queue after its last request (a polling window,
/// as QEMU's iothreads have): at queue depth 1 the driver's next request follows the answer
/// within microseconds, and then needs no kick.
const IDLE_POLL: Duration = Duration::from_micros(50);

pub struct Block {
    /// Declared first so that it is dropped (waiting for its operations) before the requests
    /// whose iovecs it uses.
    ring: Option<IoRing>,
    /// Requests in flight on the ring, by slot (the ring's tag); at most the queue size.
    in_flight: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Completions reaped and not yet answered (kept to reuse its allocation).
    reaped: Vec<(u64, i32)>,
    disk: DiskImage,
    id: [u8; ID_BYTES],
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    /// A write completed since the last fdatasync began.
    unsynced: bool,
    /// The last batch stopped at its cap.
    more: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

/// A request on the ring: what to answer once it completes, and where a short transfer resumes.
struct InFlight {
    head: u16,
    status: GuestAddress,
    op: Op,
    segs: Vec<Segment>,
    /// What the ring transfers: `segs` from byte `done` on, as iovecs into guest memory.
    iov: Vec<libc::iovec>,
    offset: u64,
    done: u64,
}

// SAFETY: the iovecs' pointers name guest memory, which stays mapped for the device's whole life
// and is shared with the vCPU threads anyway; they are handed to the kernel, never dereferenced.
unsafe impl Send for InFlight {}

/// What `execute` did with a request.
enum Outcome {
    /// Answered: the bytes written into the chain's device-writable buffers, for the used ring.
    Done(u32),
    /// On the ring; `complete` answers it.
    Started,
}

/// A run of guest memory a descriptor names.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: u64,
    len: u64,
}

/// The segments covering bytes `skip..skip + take` of `segs` laid end to end.
fn sub_segments(segs: &[Segment], mut skip: u64, mut take: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        if take == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let len = (s.len - skip).min(take);
        out.push(Segment {
            addr: s.addr + skip,
            len,
        });
        take -= len;
        skip = 0;
    }
    out
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Iovecs for `segs`; None when one is not wholly in guest RAM.
fn iovecs(segs: &[Segment], mem: &GuestMem) -> Option<Vec<libc::iovec>> {
    segs.iter()
        .map(|s| {
            let slice = mem.get_slice(GuestAddress(s.addr), s.len as usize).ok()?;
            Some(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            })
        })
        .collect()
}

/// Marks `segs` dirty in the VMM's bitmap: the kernel wrote them behind vm-memory's back.
fn mark_dirty(segs: &[Segment], mem: &GuestMem) {
    for s in segs {
        if let Ok(slice) = mem.get_slice(GuestAddress(s.addr), s.len as usize) {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

impl Block {
    pub fn new(disk: DiskImage, id: &str) -> Block {
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.sectors().to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // num_queues at 34 is meaningful only with VIRTIO_BLK_F_MQ, which is not offered.
        config[34..36].copy_from_slice(&1u16.to_le_bytes());
        // max_discard_sectors, max_discard_seg, discard_sector_alignment; max_write_zeroes_sectors,
        // max_write_zeroes_seg, write_zeroes_may_unmap.
        for (at, value) in [
            (36, MAX_ZERO_SECTORS),
            (40, 1),
            (44, 1),
            (48, MAX_ZERO_SECTORS),
            (52, 1),
        ] {
            config[at..at + 4].copy_from_slice(&value.to_le_bytes());
        }
        config[56] = 1;
        // Without io_uring (an old kernel, a seccomp filter) every request is served at once.
        let ring = IoRing::new(u32::from(QUEUE_SIZE)).ok();
        Block {
            ring,
            in_flight: (0..QUEUE_SIZE).map(|_| None).collect(),
            free: (0..QUEUE_SIZE as usize).rev().collect(),
            reaped: Vec::new(),
            disk,
            id: id_bytes,
            config,
            queue_sizes: [QUEUE_SIZE],
            unsynced: false,
            more: false,
        }
    }

    /// Serves one request, or puts it on the ring.
    fn execute(
        &mut self,
        head: u16,
        readable: &[Segment],
        writable: &[Segment],
        mem: &GuestMem,
    ) -> Outcome {
        let Some(status) = writable
            .last()
            .filter(|s| s.len >= 1)
            .map(|s| GuestAddress(s.addr + s.len - 1))
        else {
            // No room for a status byte: nothing can be said to the driver.
            return Outcome::Done(0);
        };
        let mut header = [0u8; HEADER_LEN as usize];
        let header_segs = sub_segments(readable, 0, HEADER_LEN);
        let mut written = 0usize;
        for s in &header_segs {
            if mem
                .read_slice(
                    &mut header[written..written + s.len as usize],
                    GuestAddress(s.addr),
                )
                .is_err()
            {
                break;
            }
            written += s.len as usize;
        }
        let mut data_written = 0u64;
        let code = if written < HEADER_LEN as usize {
            VIRTIO_BLK_S_IOERR
        } else {
            let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
            let data_in = total(writable) - 1;
            let started = match kind {
                VIRTIO_BLK_T_IN => {
                    let segs = sub_segments(writable, 0, data_in);
                    self.transfer(head, status, sector, segs, mem, Op::Read)
                }
                VIRTIO_BLK_T_OUT if self.disk.readonly => Some(VIRTIO_BLK_S_IOERR),
                VIRTIO_BLK_T_OUT => {
                    let segs = sub_segments(
                        readable,
                        HEADER_LEN,
                        total(readable).saturating_sub(HEADER_LEN),
                    );
                    self.transfer(head, status, sector, segs, mem, Op::Write)
                }
                VIRTIO_BLK_T_FLUSH => self.flush(head, status),
                _ => None,
            };
            if matches!(kind, VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) {
                self.unsynced = true;
            }
            match kind {
                VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_FLUSH => match started {
                    None => return Outcome::Started,
                    Some(code) => {
                        if kind == VIRTIO_BLK_T_IN && code == VIRTIO_BLK_S_OK {
                            data_written = data_in;
                        }
                        code
                    }
                },
                VIRTIO_BLK_T_GET_ID => {
                    let segs = sub_segments(writable, 0, data_in.min(ID_BYTES as u64));
                    let mut off = 0usize;
                    let mut ok = true;
                    for s in &segs {
                        ok &= mem
                            .write_slice(&self.id[off..off + s.len as usize], GuestAddress(s.addr))
                            .is_ok();
                        off += s.len as usize;
                    }
                    data_written = off as u64;
                    if ok {
                        VIRTIO_BLK_S_OK
                    } else {
                        VIRTIO_BLK_S_IOERR
                    }
                }
                VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if self.disk.readonly => {
                    VIRTIO_BLK_S_IOERR
                }
                VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                    let segs = sub_segments(
                        readable,
                        HEADER_LEN,
                        total(readable).saturating_sub(HEADER_LEN),
                    );
                    self.zero_range(kind, &segs, mem)
                }
                _ => VIRTIO_BLK_S_UNSUPP,
            }
        };
        // write_obj goes through vm-memory, which marks the status byte's page dirty.
        let _ = mem.write_obj(code, status);
        Outcome::Done((data_written + 1) as u32)
    }

    /// No slot left for another request on the ring.
    fn full(&self) -> bool {
        self.ring.is_some() && self.free.is_empty()
    }

    /// A FLUSH: it covers the writes completed before it (virtio 1.2 §5.2.6.2), which are in the
    /// page cache by now, so one fdatasync on the ring does; None while that runs.
    fn flush(&mut self, head: u16, status: GuestAddress) -> Option<u8> {
        if !self.unsynced || self.ring.is_none() {
            return Some(match self.sync_backing() {
                Ok(()) => VIRTIO_BLK_S_OK,
                Err(_) => VIRTIO_BLK_S_IOERR,
            });
        }
        self.unsynced = false;
        let slot = self
            .free
            .pop()
            .expect("process_queue takes requests only with a free slot");
        let fd = self.disk.as_raw_fd();
        let ring = self.ring.as_mut().expect("checked above");
        if ring.push_fdatasync(fd, slot as u64).is_err() {
            self.free.push(slot);
            self.unsynced = true;
            return Some(VIRTIO_BLK_S_IOERR);
        }
        self.in_flight[slot] = Some(InFlight {
            head,
            status,
            op: Op::Flush,
            segs: Vec::new(),
            iov: Vec::new(),
            offset: 0,
            done: 0,
        });
        None
    }

    /// Puts what is left of slot `slot`'s transfer on the ring.
    fn push_transfer(&mut self, slot: usize, mem: &GuestMem) -> std::io::Result<()> {
        let fd = self.disk.as_raw_fd();
        let r = self.in_flight[slot]
            .as_mut()
            .expect("a request in the slot");
        let rest = sub_segments(&r.segs, r.done, total(&r.segs) - r.done);
        r.iov = iovecs(&rest, mem).ok_or(std::io::ErrorKind::InvalidInput)?;
        let ring = self
            .ring
            .as_mut()
            .expect("transfers go on the ring only with one");
        // SAFETY: the iovecs name guest memory, mapped while the device lives (the ring is dropped,
        // waiting for its operations, before the memory); the iovec array stays in the slot until
        // this slot's completion is reaped.
        unsafe {
            ring.push_rw(
                fd,
                &r.iov,
                r.offset + r.done,
                r.op == Op::Write,
                slot as u64,
            )
        }
    }

    /// Settles a completion of slot `slot`: the (head, used length) to answer, or None when the
    /// rest of a short transfer went back on the ring.
    fn settle(&mut self, slot: usize, res: i32, mem: &GuestMem) -> Option<(u16, u32)> {
        let r = self.in_flight.get_mut(slot)?.as_mut()?;
        let len = total(&r.segs);
        let retry = res == -libc::EINTR || res == -libc::EAGAIN;
        let code = match r.op {
            Op::Flush if res < 0 => {
                self.unsynced = true;
                VIRTIO_BLK_S_IOERR
            }
            Op::Flush => VIRTIO_BLK_S_OK,
            _ if retry || (res > 0 && r.done + (res as u64) < len) => {
                r.done += res.max(0) as u64;
                if self.push_transfer(slot, mem).is_ok() {
                    return None;
                }
                VIRTIO_BLK_S_IOERR
            }
            _ if res >= 0 && r.done + res as u64 == len => VIRTIO_BLK_S_OK,
            _ => VIRTIO_BLK_S_IOERR,
        };
        let r = self.in_flight[slot].take().expect("checked above");
        self.free.push(slot);
        match r.op {
            // Marked once the kernel has written them (a failed read may have written some):
            // marked any earlier, a pre-copy pass could send the page before the data landed.
            Op::Read => mark_dirty(&r.segs, mem),
            Op::Write => self.unsynced = true,
            Op::Flush => {}
        }
        let _ = mem.write_obj(code, r.status);
        let data = if r.op == Op::Read && code == VIRTIO_BLK_S_OK {
            len
        } else {
            0
        };
        Some((r.head, (data + 1) as u32))
    }

    /// A DISCARD or WRITE_ZEROES request: exactly one range {sector, num_sectors, flags} (16
    /// bytes, as max_*_seg says). DISCARD takes no flags; WRITE_ZEROES' unmap flag punches a hole.
    fn zero_range(&self, kind: u32, segs: &[Segment], mem: &GuestMem) -> u8 {
        if total(segs) != RANGE_LEN {
            return VIRTIO_BLK_S_UNSUPP;
        }
        let mut range = [0u8; RANGE_LEN as usize];
        let mut off = 0;
        for s in segs {
            if mem
                .read_slice(&mut range[off..off + s.len as usize], GuestAddress(s.addr))
                .is_err()
            {
                return VIRTIO_BLK_S_IOERR;
            }
            off += s.len as usize;
        }
        let sector = u64::from_le_bytes(range[0..8].try_into().unwrap());
        let count = u32::from_le_bytes(range[8..12].try_into().unwrap());
        let flags = u32::from_le_bytes(range[12..16].try_into().unwrap());
        let allowed = if kind == VIRTIO_BLK_T_WRITE_ZEROES {
            RANGE_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return VIRTIO_BLK_S_UNSUPP;
        }
        let in_disk = sector
            .checked_add(u64::from(count))
            .is_some_and(|end| end <= self.disk.sectors());
        if count > MAX_ZERO_SECTORS || !in_disk {
            return VIRTIO_BLK_S_IOERR;
        }
        let (offset, len) = (sector * SECTOR_SIZE, u64::from(count) * SECTOR_SIZE);
        let r = if kind == VIRTIO_BLK_T_DISCARD || flags & RANGE_FLAG_UNMAP != 0 {
            self.disk.punch_hole(offset, len)
        } else {
            self.disk.write_zeroes(offset, len)
        };
        match r {
            Ok(()) => VIRTIO_BLK_S_OK,
            // A discard is a hint: a file system that cannot punch holes keeps the data.
            Err(e)
                if kind == VIRTIO_BLK_T_DISCARD && e.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                VIRTIO_BLK_S_OK
            }
            Err(_) => VIRTIO_BLK_S_IOERR,
        }
    }

    /// Reads or writes the disk from `sector` on, through `segs` of guest memory: on the ring
    /// (None: `complete` answers it) or at once (the status).
    fn transfer(
        &mut self,
        head: u16,
        status: GuestAddress,
        sector: u64,
        segs: Vec<Segment>,
        mem: &GuestMem,
        op: Op,
    ) -> Option<u8> {
        let len = total(&segs);
        let Some(start) = sector.checked_mul(SECTOR_SIZE) else {
            return Some(VIRTIO_BLK_S_IOERR);
        };
        if !len.is_multiple_of(SECTOR_SIZE)
            || start
                .checked_add(len)
                .is_none_or(|end| end > self.disk.sectors() * SECTOR_SIZE)
        {
            return Some(VIRTIO_BLK_S_IOERR);
        }
        let write = op == Op::Write;
        if self.ring.is_some() && segs.iter().all(|s| self.disk.takes_in_place(s.addr, s.len)) {
            let slot = self
                .free
                .pop()
                .expect("process_queue takes requests only with a free slot");
            self.in_flight[slot] = Some(InFlight {
                head,
                status,
                op,
                segs,
                iov: Vec::new(),
                offset: start,
                done: 0,
            });
            if self.push_transfer(slot, mem).is_ok() {
                return None;
            }
            self.in_flight[slot] = None;
            self.free.push(slot);
            return Some(VIRTIO_BLK_S_IOERR);
        }
        if write {
            self.unsynced = true;
        }
        let mut offset = start;
        for s in &segs {
            let Ok(slice) = mem.get_slice(GuestAddress(s.addr), s.len as usize) else {
                return Some(VIRTIO_BLK_S_IOERR);
            };
            let r = if write {
                self.disk.write_from(offset, &slice)
            } else {
                self.disk.read_into(offset, &slice)
            };
            if r.is_err() {
                return Some(VIRTIO_BLK_S_IOERR);
            }
            offset += s.len;
        }
        Some(VIRTIO_BLK_S_OK)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let writes = if self.disk.readonly {
            VIRTIO_BLK_F_RO
        } else {
            VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
        };
        VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | writes
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

    fn sync_backing(&mut self) -> std::io::Result<()> {
        if std::mem::take(&mut self.unsynced) {
            if let Err(e) = self.disk.flush() {
                self.unsynced = true;
                return Err(e);
            }
        }
        Ok(())
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMem,
        rearm: bool,
    ) -> bool {
        // Its own loop rather than serve_available's: requests are started, not answered, and a
        // full ring stops the batch. At most the queue's size of chains, as serve_available.
        let mut added = false;
        let mut budget = queue.size();
        self.more = false;
        loop {
            // Errors here mean the rings left guest RAM; the queue then just stops serving.
            let _ = queue.disable_notification(mem);
            while !self.full() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                budget = budget.saturating_sub(1);
                let head = chain.head_index();
                let (mut readable, mut writable) = (Vec::new(), Vec::new());
                for d in chain {
                    let seg = Segment {
                        addr: d.addr().0,
                        len: u64::from(d.len()),
                    };
                    if d.is_write_only() {
                        writable.push(seg);
                    } else {
                        readable.push(seg);
                    }
                }
                if let Outcome::Done(len) = self.execute(head, &readable, &writable, mem) {
                    if queue.add_used(mem, head, len).is_err() {
                        return added;
                    }
                    added = true;
                }
                if budget == 0 {
                    self.more = true;
                    break;
                }
            }
            if let Some(ring) = &mut self.ring {
                // A refused submit leaves the entries queued; the next batch retries it.
                let _ = ring.submit();
            }
            // With every slot taken, notifications stay off (completions bring the worker back),
            // and after a capped batch (the worker serves the queue again at once).
            if !rearm
                || self.more
                || self.full()
                || !queue.enable_notification(mem).unwrap_or(false)
            {
                return added;
            }
        }
    }

    fn has_more(&self) -> bool {
        self.more
    }

    fn complete(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMem) -> bool {
        let Some(ring) = &mut self.ring else {
            return false;
        };
        let mut reaped = std::mem::take(&mut self.reaped);
        ring.reap(&mut reaped);
        if !reaped.is_empty() {
            // Off before the answers: a driver that sends its next request the moment it sees
            // one would otherwise still find notifications on, and kick. process_queue re-arms
            // them before the worker sleeps.
            let _ = queue.disable_notification(mem);
        }
        let mut added = false;
        for (tag, res) in reaped.drain(..) {
            if let Some((head, len)) = self.settle(tag as usize, res, mem) {
                added |= queue.add_used(mem, head, len).is_ok();
            }
        }
        self.reaped = reaped;
        if let Some(ring) = &mut self.ring {
            let _ = ring.submit(); // the rests of short transfers
        }
        added
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len() - self.free.len()
    }

    fn idle_poll(&self) -> Duration {
        IDLE_POLL
    }

    fn completion_event(&self) -> Option<&EventFd> {
        self.ring.as_ref().map(IoRing::event)
    }

    fn reset(&mut self, mem: &GuestMem) {
        self.more = false;
        // Nothing is answered any more, but reads still land in guest RAM and count as dirty.
        while self.in_flight() > 0 {
            let Some(ring) = &mut self.ring else {
                break;
            };
            let mut reaped = std::mem::take(&mut self.reaped);
            if ring.submit().and_then(|()| ring.wait()).is_err() {
                // The ring is unusable: dropping it waits as well as it can; serve at once now.
                self.ring = None;
            } else {
                ring.reap(&mut reaped);
            }
            for (tag, _) in reaped.drain(..) {
                if let Some(r) = self.in_flight.get_mut(tag as usize).and_then(Option::take) {
                    self.free.push(tag as usize);
                    match r.op {
                        Op::Read => mark_dirty(&r.segs, mem),
                        Op::Write => self.unsynced = true,
                        Op::Flush => {}
                    }
                }
            }
            self.reaped = reaped;
        }
        if self.ring.is_none() {
            self.in_flight.fill_with(|| None);
            self.free = (0..self.in_flight.len()).rev().collect();
        }
    }
}
