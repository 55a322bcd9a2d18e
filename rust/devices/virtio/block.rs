//! virtio-blk (virtio 1.2 §5.2) over a raw image: one request queue; IN, OUT, FLUSH, GET_ID, and
//! for writable disks DISCARD (a punched hole) and WRITE_ZEROES; anything else answered
//! VIRTIO_BLK_S_UNSUPP; writes of any kind to a read-only disk VIRTIO_BLK_S_IOERR.
//! Requests are served synchronously on the device's worker thread.

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::disk_image::{DiskImage, SECTOR_SIZE};
use super::{
    serve_available, VirtioDevice, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
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

pub struct Block {
    disk: DiskImage,
    id: [u8; ID_BYTES],
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    /// The image was written since its last fdatasync.
    unsynced: bool,
    /// The last batch stopped at its cap.
    more: bool,
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
        Block {
            disk,
            id: id_bytes,
            config,
            queue_sizes: [QUEUE_SIZE],
            unsynced: false,
            more: false,
        }
    }

    /// Serves one request; returns the bytes written into the chain's device-writable buffers
    /// (data and status), for the used ring.
    fn execute(&mut self, readable: &[Segment], writable: &[Segment], mem: &GuestMem) -> u32 {
        let Some(status) = writable
            .last()
            .filter(|s| s.len >= 1)
            .map(|s| GuestAddress(s.addr + s.len - 1))
        else {
            // No room for a status byte: nothing can be said to the driver.
            return 0;
        };
        let mut header = [0u8; HEADER_LEN as usize];
        let head = sub_segments(readable, 0, HEADER_LEN);
        let mut written = 0usize;
        for s in &head {
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
            if matches!(
                kind,
                VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
            ) {
                self.unsynced = true;
            }
            let data_in = total(writable) - 1;
            match kind {
                VIRTIO_BLK_T_IN => {
                    let segs = sub_segments(writable, 0, data_in);
                    let r = self.transfer(sector, &segs, mem, false);
                    if r == VIRTIO_BLK_S_OK {
                        data_written = data_in;
                    }
                    r
                }
                VIRTIO_BLK_T_OUT if self.disk.readonly => VIRTIO_BLK_S_IOERR,
                VIRTIO_BLK_T_OUT => {
                    let segs = sub_segments(
                        readable,
                        HEADER_LEN,
                        total(readable).saturating_sub(HEADER_LEN),
                    );
                    self.transfer(sector, &segs, mem, true)
                }
                VIRTIO_BLK_T_FLUSH => match self.sync_backing() {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(_) => VIRTIO_BLK_S_IOERR,
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
        (data_written + 1) as u32
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

    /// Reads (`write` false) or writes the disk from `sector` on, through `segs` of guest memory.
    fn transfer(&self, sector: u64, segs: &[Segment], mem: &GuestMem, write: bool) -> u8 {
        let len = total(segs);
        let Some(start) = sector.checked_mul(SECTOR_SIZE) else {
            return VIRTIO_BLK_S_IOERR;
        };
        if !len.is_multiple_of(SECTOR_SIZE)
            || start
                .checked_add(len)
                .is_none_or(|end| end > self.disk.sectors() * SECTOR_SIZE)
        {
            return VIRTIO_BLK_S_IOERR;
        }
        let mut offset = start;
        for s in segs {
            let Ok(slice) = mem.get_slice(GuestAddress(s.addr), s.len as usize) else {
                return VIRTIO_BLK_S_IOERR;
            };
            let r = if write {
                self.disk.write_from(offset, &slice)
            } else {
                self.disk.read_into(offset, &slice)
            };
            if r.is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            offset += s.len;
        }
        VIRTIO_BLK_S_OK
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

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMem) -> bool {
        let served = serve_available(queue, mem, |chain| {
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
            self.execute(&readable, &writable, mem)
        });
        self.more = served.more;
        served.added
    }

    fn has_more(&self) -> bool {
        self.more
    }
}
