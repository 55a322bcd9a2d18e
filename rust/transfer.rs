//! The Memory frame of the migration protocol (docs/migration-protocol.md): the range table, then
//! the bytes of every non-zero range, written from and read into guest memory without a copy.
//!
//! Sender: `send_memory` checks every page of the ranges it is given for all-zero content (such
//! pages travel as ZERO entries without bytes), builds the table, then writes header, table and
//! page bytes with `sendmsg`/`writev` (up to IOV_MAX iovecs per call, straight out of the guest
//! mapping). Receiver: `recv_memory` reads and validates the whole table before it touches guest
//! memory, then zeroes the ZERO ranges and reads the rest with `readv` straight into the mapping.
//!
//! Over TLS (`Link::Tls`) the same iovecs are sealed into TLS records copied once out of guest
//! memory, and full records are read and opened in guest memory (rust/tls.rs): no call per page. A `Pacer` caps and measures
//! the send rate (`max_bandwidth`); writes are cut to its slice size.
//!
//! Both block until the frame is done. On a blocking socket, SO_SNDTIMEO / SO_RCVTIMEO bound each
//! wait: when one expires (EAGAIN) the call fails with a "timed out" MigrationError. A descriptor in
//! non-blocking mode is waited for with poll(), without a bound. To abort a transfer from another
//! thread, `shutdown(fd, SHUT_RDWR)` the socket.

use std::os::fd::{AsRawFd, RawFd};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Kind, Result};
use crate::memory::{host_address, GuestRam, PAGE_SIZE};
use crate::pacer::Pacer;
use crate::ranges::RangeTable;
use crate::sparse::data_extents;
use crate::tls::TlsStream;

/// Where a Memory frame's bytes go or come from.
pub enum Link<'a> {
    /// The socket itself: sendmsg/readv straight between guest memory and the kernel.
    Plain(RawFd),
    /// The TLS session on the socket: it holds the connection's bytes in order.
    Tls(&'a mut TlsStream),
}

/// Request command of a Memory frame.
pub const CMD_MEMORY: u16 = 4;
/// Size of a request header and of a range-table entry.
pub const HEADER_SIZE: usize = 16;
pub const ENTRY_SIZE: usize = 16;
/// Entry flag: the range is all zero bytes and no bytes follow for it.
pub const FLAG_ZERO: u32 = 1;
/// Largest range in a table (bytes).
pub const RANGE_MAX: u64 = 4 << 20;
/// Largest table of one frame (bytes): 65536 entries.
pub const TABLE_MAX: u64 = 1 << 20;
/// Largest amount of RAM a caller should hand `send_memory` at once (`RangeTable::split`): its
/// table has at most 16384 entries however the zero and non-zero pages alternate, well within
/// TABLE_MAX, and the zero scan that precedes the write stays short.
pub const CHUNK_MAX: u64 = 64 << 20;

const IOV_MAX: usize = 1024;
/// Bytes per sendmsg/writev call (measured: 4 MiB calls beat 64 MiB ones on TCP loopback by ~1.5x).
const WRITE_MAX: usize = 4 << 20;
const PAGE: usize = PAGE_SIZE as usize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Page bytes sent (non-zero pages × 4096).
    pub bytes_sent: u64,
    /// Pages sent with their bytes.
    pub pages: u64,
    /// Pages sent as ZERO entries (no bytes).
    pub zero_pages: u64,
    /// Everything written: header, table and page bytes.
    pub wire_bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvStats {
    /// Page bytes read into guest memory.
    pub bytes_received: u64,
    /// Pages received with their bytes.
    pub pages: u64,
    /// Pages zeroed from ZERO entries.
    pub zero_pages: u64,
    /// Everything read after the header: table and page bytes.
    pub wire_bytes: u64,
}

fn mig_err(msg: impl Into<String>) -> Error {
    Error::new(Kind::Migration, msg)
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// EAGAIN from a blocking socket is its SO_SNDTIMEO/SO_RCVTIMEO expiring: a timeout. From a
/// descriptor in non-blocking mode it means "not now": wait for it.
pub(crate) fn would_block(fd: RawFd, events: libc::c_short, what: &str) -> Result<()> {
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags >= 0 && flags & libc::O_NONBLOCK != 0 {
        return wait_fd(fd, events);
    }
    Err(Error {
        kind: Kind::Migration,
        message: format!("migration peer timed out ({what})"),
        errno: Some(libc::EAGAIN),
    })
}

/// Waits until `fd` is readable or writable (for descriptors in non-blocking mode).
fn wait_fd(fd: RawFd, events: libc::c_short) -> Result<()> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one valid pollfd that lives across the call.
        let rc = unsafe { libc::poll(&mut p, 1, -1) };
        if rc >= 0 {
            return Ok(());
        }
        let e = last_errno();
        if e != libc::EINTR {
            return Err(Error::os(Kind::Migration, "poll", e));
        }
    }
}

/// One RAM region as the transfer code needs it.
struct Region {
    gpa: u64,
    host: *mut u8,
    size: u64,
    /// (memfd, offset of the region in it), when file-backed.
    file: Option<(RawFd, u64)>,
}

fn regions(ram: &GuestRam) -> Vec<Region> {
    ram.mem
        .iter()
        .map(|r| Region {
            gpa: r.start_addr().0,
            host: host_address(r),
            size: r.len(),
            file: r
                .file_offset()
                .map(|fo| (fo.file().as_raw_fd(), fo.start())),
        })
        .collect()
}

/// The region holding all of `gpa..gpa + len`.
fn find_region(regions: &[Region], gpa: u64, len: u64) -> Option<usize> {
    let end = gpa.checked_add(len)?;
    regions
        .iter()
        .position(|r| gpa >= r.gpa && end <= r.gpa + r.size)
}

/// True when the 4 KiB page at `p` is all zero. The guest may be writing it meanwhile (any answer
/// is then fine: the dirty log reports the page again), hence volatile loads.
#[inline]
fn page_is_zero(p: *const u8) -> bool {
    let w = p as *const u64;
    // SAFETY: `p` is a page-aligned address inside a live guest RAM mapping, so all 512 words are
    // readable and aligned; volatile reads tolerate concurrent guest writes.
    unsafe {
        if std::ptr::read_volatile(w) != 0 {
            return false; // most non-zero pages stop here
        }
        let mut i = 0;
        while i < PAGE / 8 {
            let mut acc = 0u64;
            for k in 0..16 {
                acc |= std::ptr::read_volatile(w.add(i + k));
            }
            if acc != 0 {
                return false;
            }
            i += 16;
        }
    }
    true
}

fn iov(base: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    }
}

/// Appends `len` bytes at `base` to `iovs`, extending the last iovec when contiguous.
fn push_iov(iovs: &mut Vec<libc::iovec>, base: *mut u8, len: usize) {
    if let Some(last) = iovs.last_mut() {
        if (last.iov_base as usize) + last.iov_len == base as usize {
            last.iov_len += len;
            return;
        }
    }
    iovs.push(iov(base, len));
}

/// Drops `n` transferred bytes from the front of `iovs[*idx..]`.
fn advance(iovs: &mut [libc::iovec], idx: &mut usize, mut n: usize) {
    while n > 0 {
        let v = &mut iovs[*idx];
        if n >= v.iov_len {
            n -= v.iov_len;
            *idx += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same buffer.
            v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    while *idx < iovs.len() && iovs[*idx].iov_len == 0 {
        *idx += 1;
    }
}

/// Writes every byte `iovs` describes. `sendmsg(MSG_NOSIGNAL)` on sockets (a vanished peer gives
/// EPIPE, never SIGPIPE); `writev` on other descriptors. Each call is accounted to `pacer`.
fn write_all(fd: RawFd, iovs: &mut [libc::iovec], pacer: Option<&Pacer>) -> Result<()> {
    let write_max = pacer.map_or(WRITE_MAX, |p| p.slice(WRITE_MAX));
    let mut idx = 0;
    advance(iovs, &mut idx, 0);
    let mut socket = true;
    while idx < iovs.len() {
        // At most IOV_MAX iovecs and about WRITE_MAX bytes per call (the last iovec is shortened
        // for the call): one huge sendmsg keeps TCP from processing ACKs while it copies.
        let (mut cnt, mut total) = (0, 0);
        while idx + cnt < iovs.len() && cnt < IOV_MAX && total < write_max {
            total += iovs[idx + cnt].iov_len;
            cnt += 1;
        }
        let last = idx + cnt - 1;
        let last_len = iovs[last].iov_len;
        if total > write_max {
            iovs[last].iov_len -= total - write_max;
        }
        let ptr = iovs[idx..].as_ptr();
        let n = if socket {
            // SAFETY: msghdr is plain data; zeroed is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = ptr as *mut libc::iovec;
            msg.msg_iovlen = cnt as _;
            // SAFETY: the iovecs describe live, readable memory (guest RAM, the table, the header).
            unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) }
        } else {
            // SAFETY: as above.
            unsafe { libc::writev(fd, ptr, cnt as libc::c_int) }
        };
        iovs[last].iov_len = last_len;
        if n < 0 {
            match last_errno() {
                libc::EINTR => continue,
                libc::EAGAIN => {
                    would_block(fd, libc::POLLOUT, "sending a Memory frame")?;
                    continue;
                }
                libc::ENOTSOCK if socket => {
                    socket = false;
                    continue;
                }
                e => return Err(Error::os(Kind::Migration, "sending a Memory frame", e)),
            }
        }
        if n == 0 {
            return Err(mig_err(
                "sending a Memory frame: the connection accepts no more bytes",
            ));
        }
        advance(iovs, &mut idx, n as usize);
        if let Some(p) = pacer {
            p.take(n as usize)?;
        }
    }
    Ok(())
}

/// `write_all` over TLS: the iovecs' bytes are encrypted straight out of their buffers into
/// records that span iovecs, in pieces of the pacer's slice size.
fn write_all_tls(tls: &mut TlsStream, iovs: &[libc::iovec], pacer: Option<&Pacer>) -> Result<()> {
    let piece = pacer.map_or(WRITE_MAX, |p| p.slice(WRITE_MAX));
    let mut parts: Vec<&[u8]> = Vec::with_capacity(iovs.len().min(IOV_MAX));
    let mut len = 0;
    let mut flush = |parts: &mut Vec<&[u8]>, len: &mut usize| -> Result<()> {
        tls.write_gather(parts)?;
        if let Some(p) = pacer {
            p.take(*len)?;
        }
        parts.clear();
        *len = 0;
        Ok(())
    };
    for v in iovs {
        // SAFETY: the iovec describes live, readable memory (guest RAM, the table, the header).
        // The guest may write its pages while they are read: each record's bytes are copied once
        // and the copy is encrypted, and the dirty log sends such a page again, the same contract
        // as the kernel's copy in sendmsg.
        let mut bytes = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
        while !bytes.is_empty() {
            let take = (piece - len).min(bytes.len());
            parts.push(&bytes[..take]);
            bytes = &bytes[take..];
            len += take;
            if len == piece {
                flush(&mut parts, &mut len)?;
            }
        }
    }
    if len > 0 {
        flush(&mut parts, &mut len)?;
    }
    Ok(())
}

/// `read_all` over TLS: decrypted bytes go straight into each iovec's buffer.
fn read_all_tls(tls: &mut TlsStream, iovs: &[libc::iovec]) -> Result<()> {
    for v in iovs {
        // SAFETY: the iovec describes live, writable memory: our own buffers, or validated guest
        // RAM of a VM whose vCPUs have not run (the receiver joins every connection's reader
        // before it loads the state). Only these readers write it, one frame each, and a source's
        // concurrent frames name disjoint pages (each pass's frames are answered before the
        // next); a source that broke that would race two copies into pages of its own guest,
        // plain bytes with no invariant, as two readv()s into them would.
        let bytes = unsafe { std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len) };
        tls.read_exact(bytes)?;
    }
    Ok(())
}

/// Fills every byte `iovs` describes from `fd`; the stream ending first is an error.
fn read_all(fd: RawFd, iovs: &mut [libc::iovec]) -> Result<()> {
    let mut idx = 0;
    advance(iovs, &mut idx, 0);
    while idx < iovs.len() {
        let cnt = (iovs.len() - idx).min(IOV_MAX);
        // SAFETY: the iovecs describe live, writable memory: validated guest RAM ranges or our
        // own buffers.
        let n = unsafe { libc::readv(fd, iovs[idx..].as_ptr(), cnt as libc::c_int) };
        if n < 0 {
            match last_errno() {
                libc::EINTR => continue,
                libc::EAGAIN => {
                    would_block(fd, libc::POLLIN, "receiving a Memory frame")?;
                    continue;
                }
                e => return Err(Error::os(Kind::Migration, "receiving a Memory frame", e)),
            }
        }
        if n == 0 {
            return Err(mig_err("the migration stream ended inside a Memory frame"));
        }
        advance(iovs, &mut idx, n as usize);
    }
    Ok(())
}

/// Writes one complete Memory frame for the pages of `table` (page aligned, inside guest RAM, at
/// most CHUNK_MAX bytes of non-zero pages and TABLE_MAX / 16 entries after zero splitting: pass
/// chunks of at most CHUNK_MAX bytes; the receiver refuses larger frames).
/// Nothing is written when the table is refused; after that only a socket error stops it midway.
pub fn send_memory(
    link: Link,
    ram: &GuestRam,
    table: &RangeTable,
    pacer: Option<&Pacer>,
) -> Result<SendStats> {
    send_frame(link, ram, table, TABLE_MAX as usize / ENTRY_SIZE, pacer)
}

/// The table and data iovecs of a frame being built.
struct Frame {
    entries: Vec<u8>,
    data: Vec<libc::iovec>,
    stats: SendStats,
}

impl Frame {
    fn emit(&mut self, gpa: u64, host: *mut u8, pages: u64, zero: bool) {
        let len = pages * PAGE_SIZE;
        self.entries.extend_from_slice(&gpa.to_le_bytes());
        self.entries.extend_from_slice(&(len as u32).to_le_bytes());
        self.entries
            .extend_from_slice(&(if zero { FLAG_ZERO } else { 0 }).to_le_bytes());
        if zero {
            self.stats.zero_pages += pages;
        } else {
            self.stats.pages += pages;
            self.stats.bytes_sent += len;
            push_iov(&mut self.data, host, len as usize);
        }
    }
}

fn send_frame(
    link: Link,
    ram: &GuestRam,
    table: &RangeTable,
    max_entries: usize,
    pacer: Option<&Pacer>,
) -> Result<SendStats> {
    let regions = regions(ram);
    let guess = table.len().min(4096);
    let mut f = Frame {
        entries: Vec::with_capacity(guess * ENTRY_SIZE),
        data: Vec::with_capacity(guess),
        stats: SendStats::default(),
    };
    let run_max = RANGE_MAX / PAGE_SIZE;
    for r in table {
        if !r.gpa.is_multiple_of(PAGE_SIZE) || !r.len.is_multiple_of(PAGE_SIZE) {
            return Err(mig_err(format!(
                "range {:#x}+{:#x} is not page aligned",
                r.gpa, r.len
            )));
        }
        // A range may span regions that touch; walk it region by region.
        let (mut gpa, end) = (r.gpa, r.end());
        while gpa < end {
            let reg = regions
                .iter()
                .find(|g| gpa >= g.gpa && gpa < g.gpa + g.size)
                .ok_or_else(|| {
                    mig_err(format!(
                        "range {:#x}+{:#x} is outside guest RAM",
                        r.gpa, r.len
                    ))
                })?;
            let seg_end = end.min(reg.gpa + reg.size);
            let pages = (seg_end - gpa) / PAGE_SIZE;
            // SAFETY: gpa - reg.gpa < reg.size, so the pointer stays inside the region's mapping.
            let host = unsafe { reg.host.add((gpa - reg.gpa) as usize) };
            let page_ptr = |p: u64| -> *mut u8 {
                // SAFETY: p < pages, and the segment lies inside the region's mapping.
                unsafe { host.add((p * PAGE_SIZE) as usize) }
            };
            // Runs of zero / non-zero pages, each at most RANGE_MAX.
            let mut run_start = 0u64;
            let mut run_zero = page_is_zero(page_ptr(0));
            for p in 1..pages {
                let z = page_is_zero(page_ptr(p));
                if z != run_zero || p - run_start == run_max {
                    f.emit(
                        gpa + run_start * PAGE_SIZE,
                        page_ptr(run_start),
                        p - run_start,
                        run_zero,
                    );
                    run_start = p;
                    run_zero = z;
                }
            }
            f.emit(
                gpa + run_start * PAGE_SIZE,
                page_ptr(run_start),
                pages - run_start,
                run_zero,
            );
            gpa = seg_end;
        }
        if f.entries.len() / ENTRY_SIZE > max_entries {
            return Err(mig_err(format!(
                "the Memory frame needs more than {max_entries} ranges (TABLE_MAX); pass chunks of at most {CHUNK_MAX} bytes"
            )));
        }
    }

    if f.stats.bytes_sent > CHUNK_MAX {
        return Err(mig_err(format!(
            "the Memory frame carries {} bytes of pages; pass chunks of at most {CHUNK_MAX} bytes",
            f.stats.bytes_sent
        )));
    }
    let mut header = [0u8; HEADER_SIZE];
    header[0..2].copy_from_slice(&CMD_MEMORY.to_le_bytes());
    header[8..16].copy_from_slice(&(f.entries.len() as u64).to_le_bytes());
    let mut iovs = Vec::with_capacity(f.data.len() + 2);
    iovs.push(iov(header.as_mut_ptr(), HEADER_SIZE));
    iovs.push(iov(f.entries.as_mut_ptr(), f.entries.len()));
    iovs.extend_from_slice(&f.data);
    f.stats.wire_bytes = (HEADER_SIZE + f.entries.len()) as u64 + f.stats.bytes_sent;
    match link {
        Link::Plain(fd) => write_all(fd, &mut iovs, pacer)?,
        Link::Tls(tls) => write_all_tls(tls, &iovs, pacer)?,
    }
    Ok(f.stats)
}

/// A validated table entry.
struct Entry {
    region: usize,
    offset: u64,
    len: u64,
    zero: bool,
}

/// Reads the rest of a Memory frame whose 16-byte header (length `table_len`) the caller has read:
/// the table, validated as a whole before any guest byte changes, then the page bytes into guest
/// RAM. On an error the frame is not consumed entirely: drop the connection (and the half-built
/// guest).
pub fn recv_memory(mut link: Link, ram: &GuestRam, table_len: u64) -> Result<RecvStats> {
    if !table_len.is_multiple_of(ENTRY_SIZE as u64) {
        return Err(mig_err(format!(
            "Memory frame table length {table_len} is not a multiple of {ENTRY_SIZE}"
        )));
    }
    if table_len > TABLE_MAX {
        return Err(mig_err(format!(
            "Memory frame table length {table_len} exceeds TABLE_MAX ({TABLE_MAX})"
        )));
    }
    let mut table = vec![0u8; table_len as usize];
    let mut table_iov = [iov(table.as_mut_ptr(), table.len())];
    match &mut link {
        Link::Plain(fd) => read_all(*fd, &mut table_iov)?,
        Link::Tls(tls) => read_all_tls(tls, &table_iov)?,
    }

    let regions = regions(ram);
    let mut entries = Vec::with_capacity(table.len() / ENTRY_SIZE);
    let mut prev_end = 0u64;
    let mut data = 0u64; // bytes of the non-zero ranges: what follows the table
    for (i, e) in table.chunks_exact(ENTRY_SIZE).enumerate() {
        let gpa = u64::from_le_bytes(e[0..8].try_into().unwrap());
        let len = u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64;
        let flags = u32::from_le_bytes(e[12..16].try_into().unwrap());
        let bad = |why: &str| {
            mig_err(format!(
                "Memory frame range {i} ({gpa:#x}+{len:#x}, flags {flags:#x}): {why}"
            ))
        };
        if flags & !FLAG_ZERO != 0 {
            return Err(bad("unknown flags"));
        }
        if len == 0 || len > RANGE_MAX {
            return Err(bad("length is 0 or above RANGE_MAX"));
        }
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(bad("not page aligned"));
        }
        if i > 0 && gpa < prev_end {
            return Err(bad("ranges are not in ascending order or overlap"));
        }
        let region = find_region(&regions, gpa, len)
            .ok_or_else(|| bad("not inside one guest RAM region"))?;
        prev_end = gpa + len;
        let zero = flags & FLAG_ZERO != 0;
        if !zero {
            data += len;
        }
        entries.push(Entry {
            region,
            offset: gpa - regions[region].gpa,
            len,
            zero,
        });
    }

    // What a sender puts in one frame; a larger one would have the prefault below populate
    // guest RAM far ahead of the bytes that actually arrive.
    if data > CHUNK_MAX {
        return Err(mig_err(format!(
            "Memory frame carries {data} bytes of pages, above CHUNK_MAX ({CHUNK_MAX})"
        )));
    }
    let mut stats = RecvStats {
        wire_bytes: table_len,
        bytes_received: data,
        ..Default::default()
    };
    let mut iovs: Vec<libc::iovec> = Vec::new();
    for e in &entries {
        let reg = &regions[e.region];
        if e.zero {
            zero_range(reg, e.offset, e.len);
            stats.zero_pages += e.len / PAGE_SIZE;
        } else {
            // SAFETY: validated above: offset + len <= the region's size.
            let host = unsafe { reg.host.add(e.offset as usize) };
            push_iov(&mut iovs, host, e.len as usize);
            stats.pages += e.len / PAGE_SIZE;
        }
    }
    let prefaults = prefault_runs(&regions, &entries, stats.bytes_received);
    std::thread::scope(|s| {
        if !prefaults.is_empty() {
            // A thread the host refuses only costs the hint.
            let _ = std::thread::Builder::new()
                .name("vmm-prefault".into())
                .spawn_scoped(s, move || prefault(&prefaults));
        }
        match link {
            Link::Plain(fd) => read_all(fd, &mut iovs),
            Link::Tls(tls) => read_all_tls(tls, &iovs),
        }
    })?;
    stats.wire_bytes += stats.bytes_received;
    Ok(stats)
}

/// Frames with less page data than this are received without prefaulting: a thread costs
/// more than the faults it would save.
const PREFAULT_MIN: u64 = 4 << 20;

/// The (host address, length) runs of a frame's data ranges to populate ahead of the copy.
fn prefault_runs(regions: &[Region], entries: &[Entry], data: u64) -> Vec<(usize, usize)> {
    if data < PREFAULT_MIN {
        return Vec::new();
    }
    entries
        .iter()
        .filter(|e| !e.zero)
        .map(|e| {
            (
                regions[e.region].host as usize + e.offset as usize,
                e.len as usize,
            )
        })
        .collect()
}

/// Faults in the frame's pages (MADV_POPULATE_WRITE: allocated, zeroed and mapped) on a thread of
/// its own while the socket's bytes are copied into them, from the frame's end backwards in 1 MiB
/// steps: the copy goes forwards, so the two cores fault disjoint pages until they meet, and
/// once they have met what is left is already mapped. Only a hint: a populate that fails changes
/// nothing.
fn prefault(runs: &[(usize, usize)]) {
    const STEP: usize = 1 << 20;
    for &(addr, len) in runs.iter().rev() {
        let mut end = len;
        while end > 0 {
            let start = end.saturating_sub(STEP);
            // SAFETY: madvise on a range of the RAM's mapping (held for the frame's whole receive
            // by the caller) inside a validated region; POPULATE_WRITE keeps existing data.
            unsafe {
                libc::madvise(
                    (addr + start) as *mut libc::c_void,
                    end - start,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            end = start;
        }
    }
}

/// Zeroes `offset..offset + len` of a region. Parts that are holes of its memfd read as zero
/// already and are left alone, so zero pages do not allocate memory on the destination; private
/// RAM's pages are dropped (MADV_DONTNEED: they read as zero again, and a fresh destination's
/// untouched pages stay untouched).
fn zero_range(reg: &Region, offset: u64, len: u64) {
    let memset = |from: u64, to: u64| {
        // SAFETY: from..to lies within offset..offset + len, validated to be inside the region.
        unsafe { std::ptr::write_bytes(reg.host.add(from as usize), 0, (to - from) as usize) }
    };
    let Some((fd, fstart)) = reg.file else {
        // SAFETY: a page-aligned range (validated to lie inside the region) of the RAM's private
        // anonymous mapping, which the caller holds for the frame's receive.
        let rc = unsafe {
            libc::madvise(
                reg.host.add(offset as usize).cast(),
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            memset(offset, offset + len);
        }
        return;
    };
    // What the file cannot tell about is written with zeros.
    for extent in data_extents(fd, fstart + offset, len) {
        let (off, n) = extent.unwrap_or_else(|unknown| unknown.as_data());
        memset(offset + off, offset + off + n);
    }
}

/// Waits for `sock` to become readable (or hung up) by polling it (crate::spin), for `spin` at
/// most: bytes that arrive within it are read without the wake-up of a thread asleep in recv
/// (~30-45 us on a nested host). False if `spin` passed first.
pub fn await_readable(sock: RawFd, spin: std::time::Duration) -> bool {
    let mut ready = false;
    let look = || {
        let mut pfd = libc::pollfd {
            fd: sock,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a zero timeout.
        ready = unsafe { libc::poll(&mut pfd, 1, 0) } > 0;
        !ready
    };
    crate::spin::spin_while(look, std::time::Instant::now() + spin);
    ready
}

/// Socket options for a migration connection, by family (chosen by loopback measurements):
/// * Unix stream: 4 MiB SO_SNDBUF/SO_RCVBUF (the default ~208 KiB send buffer caps throughput).
/// * TCP: TCP_NODELAY, so the tail of a frame or a small request (State, Complete) is not held back
///   by Nagle waiting for an ACK that delayed-ACK holds back in turn; frames are written in 4 MiB
///   calls, so segments stay full. Buffer sizes stay autotuned: a fixed SO_RCVBUF would switch
///   autotuning off (tcp_rmem allows far more than 4 MiB) and measured no faster.
///
/// A descriptor that is no socket is an error.
pub fn tune_socket(sock: RawFd) -> Result<()> {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `domain` and `len` are valid for getsockopt to write an int.
    let rc = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(Error::os(Kind::Migration, "migration socket", last_errno()));
    }
    let set = |level: libc::c_int, name: libc::c_int, what: &str, val: libc::c_int| -> Result<()> {
        // SAFETY: `val` is a c_int that lives across the call; its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                sock,
                level,
                name,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(Error::os(Kind::Migration, what, last_errno()));
        }
        Ok(())
    };
    match domain {
        libc::AF_UNIX => {
            set(
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                "setsockopt SO_SNDBUF",
                UNIX_SOCKET_BUFFER,
            )?;
            set(
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                "setsockopt SO_RCVBUF",
                UNIX_SOCKET_BUFFER,
            )
        }
        libc::AF_INET | libc::AF_INET6 => set(
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            "setsockopt TCP_NODELAY",
            1,
        ),
        _ => Ok(()),
    }
}

const UNIX_SOCKET_BUFFER: libc::c_int = 4 << 20;
#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const MIB: u64 = 1 << 20;
    const P: u64 = PAGE_SIZE;

    fn socketpair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        assert_eq!(
            // SAFETY: `fds` has room for the two descriptors socketpair returns.
            unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            },
            0
        );
        // SAFETY: both descriptors are fresh and owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn two_regions() -> Arc<GuestRam> {
        GuestRam::with_ranges(&[(0, 8 * MIB), (16 * MIB, 4 * MIB)]).unwrap()
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn fill_random(ram: &GuestRam, gpa: u64, len: u64, rng: &mut Rng) {
        let bytes: Vec<u8> = (0..len / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect();
        ram.mem.write_slice(&bytes, GuestAddress(gpa)).unwrap();
    }

    fn read(ram: &GuestRam, gpa: u64, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        ram.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    fn snapshot(ram: &GuestRam) -> Vec<Vec<u8>> {
        ram.regions()
            .iter()
            .map(|&(gpa, _, size)| read(ram, gpa, size))
            .collect()
    }

    fn read_exact(fd: RawFd, buf: &mut [u8]) {
        read_all(fd, &mut [iov(buf.as_mut_ptr(), buf.len())]).unwrap();
    }

    /// Reads the header as the caller of recv_memory does, then the frame.
    fn recv_frame(fd: RawFd, ram: &GuestRam) -> Result<RecvStats> {
        let mut h = [0u8; HEADER_SIZE];
        read_exact(fd, &mut h);
        assert_eq!(u16::from_le_bytes([h[0], h[1]]), CMD_MEMORY);
        recv_memory(
            Link::Plain(fd),
            ram,
            u64::from_le_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// Sends `table` from `src` on one thread, receives into `dst` here.
    fn transfer(src: &Arc<GuestRam>, dst: &GuestRam, table: &RangeTable) -> (SendStats, RecvStats) {
        let (a, b) = socketpair();
        let (src, table) = (src.clone(), table.clone());
        let sender = std::thread::spawn(move || {
            send_memory(Link::Plain(a.as_raw_fd()), &src, &table, None).unwrap()
        });
        let got = recv_frame(b.as_raw_fd(), dst).unwrap();
        (sender.join().unwrap(), got)
    }

    #[test]
    fn await_readable_sees_data_and_gives_up_without() {
        let (a, b) = socketpair();
        assert!(!await_readable(
            b.as_raw_fd(),
            std::time::Duration::from_millis(1)
        ));
        assert_eq!(
            // SAFETY: writes one byte from a live local buffer to our own socket.
            unsafe { libc::write(a.as_raw_fd(), [7u8].as_ptr().cast(), 1) },
            1
        );
        assert!(await_readable(
            b.as_raw_fd(),
            std::time::Duration::from_secs(5)
        ));
        drop(a);
        let (c, d) = socketpair();
        drop(c); // a hang-up counts: the read that follows reports it
        assert!(await_readable(
            d.as_raw_fd(),
            std::time::Duration::from_secs(5)
        ));
    }

    #[test]
    fn roundtrip_random_and_zero_pages_at_region_edges() {
        let src = two_regions();
        let dst = two_regions();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        // Region 0: 3 random pages, a zero page, 2 random pages; and the region's last page.
        fill_random(&src, 0, 3 * P, &mut rng);
        fill_random(&src, 4 * P, 2 * P, &mut rng);
        fill_random(&src, 8 * MIB - P, P, &mut rng);
        // A page that is zero except its very last byte, and one that is zero except its first.
        src.mem
            .write_obj(0xffu8, GuestAddress(0x10_0000 + P - 1))
            .unwrap();
        src.mem.write_obj(0x01u8, GuestAddress(0x10_2000)).unwrap();
        // Region 1: 2 random MiB at its start, its last page random.
        fill_random(&src, 16 * MIB, 2 * MIB, &mut rng);
        fill_random(&src, 20 * MIB - P, P, &mut rng);
        // The destination has stale non-zero data where the source is zero: it must be zeroed.
        fill_random(&dst, 3 * P, P, &mut rng);
        fill_random(&dst, 0x10_1000, P, &mut rng);
        fill_random(&dst, 18 * MIB, 64 * P, &mut rng);
        fill_random(&dst, 7 * MIB, MIB - P, &mut rng);
        let untouched_dst = read(&dst, 7 * MIB, MIB - P);

        let mut table = RangeTable::new();
        table.push(0, 6 * P);
        table.push(8 * MIB - P, P);
        table.push(0x10_0000, 3 * P);
        table.push(16 * MIB, 4 * MIB); // all of region 1: 2 MiB random, zeros, last page random
        let (sent, got) = transfer(&src, &dst, &table);

        for r in &table {
            assert_eq!(
                read(&src, r.gpa, r.len),
                read(&dst, r.gpa, r.len),
                "range {:#x}",
                r.gpa
            );
        }
        // Outside the table the destination kept what it had.
        assert_eq!(read(&dst, 7 * MIB, MIB - P), untouched_dst);
        let total = table.total_bytes() / P;
        assert_eq!(sent.pages + sent.zero_pages, total);
        assert_eq!(sent.pages, 3 + 2 + 1 + 2 + 512 + 1);
        assert_eq!(sent.bytes_sent, sent.pages * P);
        assert_eq!(
            (got.pages, got.zero_pages, got.bytes_received),
            (sent.pages, sent.zero_pages, sent.bytes_sent)
        );
        assert_eq!(got.wire_bytes + HEADER_SIZE as u64, sent.wire_bytes);
    }

    #[test]
    fn roundtrip_over_tls_with_a_pacer() {
        use crate::fixtures::make_tls_dir;
        use crate::tls::{Role, TlsContext};
        let dir = make_tls_dir("transfer", "127.0.0.1");
        let src = GuestRam::with_ranges(&[(0, 16 * MIB)]).unwrap();
        let dst = GuestRam::with_ranges(&[(0, 16 * MIB)]).unwrap();
        fill_random(&src, 0, 12 * MIB, &mut Rng(11));
        fill_random(&dst, 14 * MIB, MIB, &mut Rng(12)); // stale data where the source is zero
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = l.accept().unwrap().0;
        let server = TlsContext::load(&dir, Role::Server).unwrap();
        let accept = std::thread::spawn(move || {
            server
                .handshake(s.into(), "", std::time::Duration::from_secs(5))
                .unwrap()
        });
        let mut tx = TlsContext::load(&dir, Role::Client)
            .unwrap()
            .handshake(c.into(), "127.0.0.1", std::time::Duration::from_secs(5))
            .unwrap();
        let mut rx = accept.join().unwrap();
        let mut table = RangeTable::new();
        table.push(0, 16 * MIB);
        // 12 MiB at 24 MiB/s: about half a second.
        let pacer = Arc::new(Pacer::new(24 * MIB));
        let (src2, p2) = (src.clone(), pacer.clone());
        let t0 = std::time::Instant::now();
        let sender = std::thread::spawn(move || {
            let st = send_memory(Link::Tls(&mut tx), &src2, &table, Some(&p2)).unwrap();
            (st, tx)
        });
        let mut h = [0u8; HEADER_SIZE];
        rx.read_exact(&mut h).unwrap();
        let got = recv_memory(
            Link::Tls(&mut rx),
            &dst,
            u64::from_le_bytes(h[8..16].try_into().unwrap()),
        )
        .unwrap();
        let (sent, _tx) = sender.join().unwrap();
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(read(&src, 0, 16 * MIB), read(&dst, 0, 16 * MIB));
        assert_eq!((got.pages, got.zero_pages), (sent.pages, sent.zero_pages));
        assert_eq!(sent.bytes_sent, 12 * MIB);
        assert!(secs > 0.4, "the pacer let 12 MiB through in {secs} s");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn frame_layout() {
        let src = GuestRam::with_ranges(&[(0, 16 * MIB)]).unwrap();
        let mut rng = Rng(77);
        fill_random(&src, 0, 9 * MIB, &mut rng); // 9 MiB non-zero: split 4 + 4 + 1 MiB
                                                 // 9 MiB..16 MiB zero except the page at 12 MiB.
        fill_random(&src, 12 * MIB, P, &mut rng);
        let mut table = RangeTable::new();
        table.push(0, 16 * MIB);
        let (a, b) = socketpair();
        let src2 = src.clone();
        let t2 = table.clone();
        let sender = std::thread::spawn(move || {
            send_memory(Link::Plain(a.as_raw_fd()), &src2, &t2, None).unwrap()
        });
        let mut h = [0u8; HEADER_SIZE];
        read_exact(b.as_raw_fd(), &mut h);
        assert_eq!(&h[0..8], &[4, 0, 0, 0, 0, 0, 0, 0]);
        let len = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let mut t = vec![0u8; len as usize];
        read_exact(b.as_raw_fd(), &mut t);
        let entries: Vec<(u64, u32, u32)> = t
            .chunks(16)
            .map(|e| {
                (
                    u64::from_le_bytes(e[0..8].try_into().unwrap()),
                    u32::from_le_bytes(e[8..12].try_into().unwrap()),
                    u32::from_le_bytes(e[12..16].try_into().unwrap()),
                )
            })
            .collect();
        let m = MIB as u32;
        assert_eq!(
            entries,
            vec![
                (0, 4 * m, 0),
                (4 * MIB, 4 * m, 0),
                (8 * MIB, m, 0),
                (9 * MIB, 3 * m, FLAG_ZERO),
                (12 * MIB, P as u32, 0),
                (12 * MIB + P, 4 * m - P as u32, FLAG_ZERO),
            ]
        );
        let mut data = vec![0u8; (9 * MIB + P) as usize];
        read_exact(b.as_raw_fd(), &mut data);
        assert_eq!(&data[..9 * MIB as usize], &read(&src, 0, 9 * MIB)[..]);
        assert_eq!(&data[9 * MIB as usize..], &read(&src, 12 * MIB, P)[..]);
        let stats = sender.join().unwrap();
        assert_eq!(
            stats,
            SendStats {
                bytes_sent: 9 * MIB + P,
                pages: 9 * 256 + 1,
                zero_pages: 7 * 256 - 1,
                wire_bytes: 16 + 6 * 16 + 9 * MIB + P
            }
        );
        // Nothing more on the wire.
        // SAFETY: plain fcntl on our own descriptor.
        unsafe { libc::fcntl(b.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut one = [0u8; 1];
        assert_eq!(
            // SAFETY: reads at most one byte into `one`.
            unsafe { libc::read(b.as_raw_fd(), one.as_mut_ptr().cast(), 1) },
            0,
            "the sender closed after one frame"
        );
    }

    #[test]
    fn empty_table_is_an_empty_frame() {
        let src = two_regions();
        let dst = two_regions();
        let (sent, got) = transfer(&src, &dst, &RangeTable::new());
        assert_eq!(
            sent,
            SendStats {
                wire_bytes: 16,
                ..Default::default()
            }
        );
        assert_eq!(got, RecvStats::default());
    }

    #[test]
    fn sender_refuses_bad_tables_without_writing() {
        let src = two_regions();
        let (a, b) = socketpair();
        let mut outside = RangeTable::new();
        outside.push(8 * MIB - P, 2 * P); // runs off region 0 into the gap
        let mut unaligned = RangeTable::new();
        unaligned.push(0x800, P);
        for t in [outside, unaligned] {
            let e = send_memory(Link::Plain(a.as_raw_fd()), &src, &t, None).unwrap_err();
            assert_eq!(e.kind, Kind::Migration);
        }
        // Too many entries: every other page non-zero, limit 3 entries.
        for p in (0..8).step_by(2) {
            src.mem.write_obj(1u8, GuestAddress(p * P)).unwrap();
        }
        let mut t = RangeTable::new();
        t.push(0, 8 * P);
        assert!(send_frame(Link::Plain(a.as_raw_fd()), &src, &t, 3, None).is_err());
        assert!(send_frame(Link::Plain(a.as_raw_fd()), &src, &t, 8, None).is_ok());
        drop(a);
        let mut h = [0u8; HEADER_SIZE];
        read_exact(b.as_raw_fd(), &mut h);
        assert_eq!(
            u64::from_le_bytes(h[8..16].try_into().unwrap()),
            8 * 16,
            "only the good frame went out"
        );
    }

    /// Writes `header length` + `table` (+ `extra` bytes) to a socket, closes it, runs recv_memory.
    fn recv_raw(
        dst: &GuestRam,
        table_len: u64,
        table: &[(u64, u32, u32)],
        extra: usize,
    ) -> Result<RecvStats> {
        let (a, b) = socketpair();
        let mut bytes: Vec<u8> = Vec::new();
        for &(gpa, len, flags) in table {
            bytes.extend(gpa.to_le_bytes());
            bytes.extend(len.to_le_bytes());
            bytes.extend(flags.to_le_bytes());
        }
        bytes.extend(std::iter::repeat_n(0xabu8, extra));
        let writer = std::thread::spawn(move || {
            let mut v = [iov(bytes.as_mut_ptr(), bytes.len())];
            let _ = write_all(a.as_raw_fd(), &mut v, None);
        });
        let r = recv_memory(Link::Plain(b.as_raw_fd()), dst, table_len);
        writer.join().unwrap();
        r
    }

    #[test]
    fn receiver_refuses_bad_tables_without_writing() {
        let dst = two_regions();
        let mut rng = Rng(99);
        fill_random(&dst, 0, 8 * MIB, &mut rng);
        fill_random(&dst, 16 * MIB, 4 * MIB, &mut rng);
        let before = snapshot(&dst);
        let p = P as u32;
        let good = (0u64, p, FLAG_ZERO);
        type Table = Vec<(u64, u32, u32)>;
        let cases: Vec<(&str, Table)> = vec![
            ("outside RAM", vec![good, (8 * MIB, p, 0)]),
            (
                "across a region end",
                vec![good, (8 * MIB - P, 2 * p, FLAG_ZERO)],
            ),
            ("far outside", vec![good, (u64::MAX - P + 1, p, FLAG_ZERO)]),
            ("unaligned gpa", vec![good, (0x10_0800, p, 0)]),
            ("unaligned length", vec![good, (0x10_0000, 100, 0)]),
            ("empty", vec![good, (0x10_0000, 0, 0)]),
            ("oversize", vec![good, (0, RANGE_MAX as u32 + p, FLAG_ZERO)]),
            ("unknown flag", vec![good, (0x10_0000, p, 2)]),
            ("overlap", vec![(0, 2 * p, FLAG_ZERO), (P, p, FLAG_ZERO)]),
            ("descending", vec![(2 * P, p, FLAG_ZERO), (0, p, FLAG_ZERO)]),
        ];
        for (what, table) in cases {
            let len = 16 * table.len() as u64;
            let e = recv_raw(&dst, len, &table, 2 * P as usize).expect_err(what);
            assert_eq!(e.kind, Kind::Migration, "{what}");
            assert!(snapshot(&dst) == before, "{what}: guest memory changed");
        }
        // Bad table lengths are refused before reading anything.
        assert!(recv_raw(&dst, 24, &[good, good], 0).is_err());
        assert!(recv_raw(&dst, TABLE_MAX + 16, &[good], 0).is_err());
        // Truncated table: the header promised 3 entries, 2 came.
        assert!(recv_raw(&dst, 48, &[good, (P, p, FLAG_ZERO)], 0).is_err());
        assert!(
            snapshot(&dst) == before,
            "truncated table: guest memory changed"
        );
        // Truncated data: a stream that ends inside the page bytes is an error too.
        let e = recv_raw(&dst, 32, &[good, (0x10_0000, 2 * p, 0)], P as usize + 5).unwrap_err();
        assert!(e.message.contains("ended"), "{}", e.message);
        // And the exact amount succeeds.
        let s = recv_raw(&dst, 32, &[good, (0x10_0000, 2 * p, 0)], 2 * P as usize).unwrap();
        assert_eq!((s.pages, s.zero_pages), (2, 1));
        assert!(read(&dst, 0, P).iter().all(|&b| b == 0));
        assert!(read(&dst, 0x10_0000, 2 * P).iter().all(|&b| b == 0xab));
    }

    #[test]
    fn frames_above_chunk_max_are_refused_on_both_sides() {
        let over = CHUNK_MAX + RANGE_MAX;
        let ram = GuestRam::with_ranges(&[(0, over)]).unwrap();
        // The receiver refuses the table before it reads (or prefaults) any page.
        let table: Vec<(u64, u32, u32)> = (0..over / RANGE_MAX)
            .map(|i| (i * RANGE_MAX, RANGE_MAX as u32, 0))
            .collect();
        let e = recv_raw(&ram, 16 * table.len() as u64, &table, 0).unwrap_err();
        assert!(e.message.contains("CHUNK_MAX"), "{}", e.message);
        // The sender writes nothing for such a table (its pages are not zero).
        let mut rng = Rng(7);
        fill_random(&ram, 0, over, &mut rng);
        let mut whole = RangeTable::new();
        whole.push(0, over);
        let (a, _b) = socketpair();
        let e = send_memory(Link::Plain(a.as_raw_fd()), &ram, &whole, None).unwrap_err();
        assert!(e.message.contains("chunks of at most"), "{}", e.message);
    }

    #[test]
    fn zero_ranges_leave_holes_alone() {
        let dst = GuestRam::with_ranges(&[(0, 4 * MIB)]).unwrap();
        dst.mem.write_obj(0x55u8, GuestAddress(MIB + 7)).unwrap();
        let s = recv_raw(&dst, 16, &[(0, 4 * MIB as u32, FLAG_ZERO)], 0).unwrap();
        assert_eq!(s.zero_pages, 1024);
        assert!(
            read(&dst, MIB, P).iter().all(|&b| b == 0),
            "a written page is zeroed"
        );
        // Only the one page that had data is allocated: the rest stayed holes.
        let t = crate::dirty::all_ram(&dst);
        assert_eq!(t.total_bytes(), P);
    }

    #[test]
    fn zero_ranges_drop_private_pages() {
        let dst = GuestRam::private(&[(0, 4 * MIB)]).unwrap();
        dst.mem.write_obj(0x55u8, GuestAddress(MIB + 7)).unwrap();
        recv_raw(&dst, 16, &[(0, 4 * MIB as u32, FLAG_ZERO)], 0).unwrap();
        // Dropped, not written: no page is left, so a later first pass skips them all.
        assert!(crate::dirty::all_ram(&dst).is_empty());
        assert!(read(&dst, MIB, P).iter().all(|&b| b == 0));
    }

    #[test]
    fn nonblocking_descriptors_and_large_frames() {
        let src = GuestRam::with_ranges(&[(0, 32 * MIB)]).unwrap();
        let dst = GuestRam::with_ranges(&[(0, 32 * MIB)]).unwrap();
        let mut rng = Rng(5);
        fill_random(&src, 0, 32 * MIB, &mut rng);
        let (a, b) = socketpair();
        for fd in [a.as_raw_fd(), b.as_raw_fd()] {
            // SAFETY: plain fcntl on our own descriptors.
            unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        }
        let mut table = RangeTable::new();
        for p in 0..(32 * MIB / P) {
            if p % 3 != 0 {
                table.push(p * P, P); // many iovecs: more than IOV_MAX per frame
            }
        }
        let (src2, t2) = (src.clone(), table.clone());
        let sender = std::thread::spawn(move || {
            send_memory(Link::Plain(a.as_raw_fd()), &src2, &t2, None).unwrap()
        });
        let got = recv_frame(b.as_raw_fd(), &dst).unwrap();
        let sent = sender.join().unwrap();
        assert_eq!(got.pages, sent.pages);
        assert!(table.len() > IOV_MAX);
        // Prefaulting (the frame is over PREFAULT_MIN) stays on the pages with data, at
        // their offsets (the memfd's block count), and the skipped ones read as holes, so a later
        // first pass skips them. Checked before anything reads the mapping: a read fault
        // allocates a memfd page.
        let (_, fd, size) = dst.memfds().unwrap()[0];
        let mut data = 0;
        for extent in data_extents(fd, 0, size) {
            let (off, len) = extent.unwrap();
            assert!(
                (off / P..(off + len) / P).all(|p| p % 3 != 0),
                "{off:#x}+{len:#x}"
            );
            data += len;
        }
        assert_eq!(data, got.pages * P);
        // SAFETY: fstat fills the stat buffer for a descriptor the RAM owns.
        let st = unsafe {
            let mut st = std::mem::zeroed::<libc::stat>();
            assert_eq!(libc::fstat(fd, &mut st), 0);
            st
        };
        assert_eq!(st.st_blocks as u64 * 512, got.pages * P);
        for r in &table {
            assert_eq!(read(&src, r.gpa, r.len), read(&dst, r.gpa, r.len));
        }
        assert!(
            read(&dst, 0, P).iter().all(|&b| b == 0),
            "page 0 was not in the table"
        );
    }

    fn set_timeout(fd: RawFd, opt: libc::c_int, ms: i64) {
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: ms * 1000,
        };
        // SAFETY: `tv` is a valid timeval for the option.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
    }

    #[test]
    fn blocking_socket_timeouts_fail_the_frame() {
        let ram = two_regions();
        fill_random(&ram, 0, 8 * MIB, &mut Rng(3));
        let (a, b) = socketpair();
        // Nobody reads: the send fills the socket buffer, then SO_SNDTIMEO expires.
        set_timeout(a.as_raw_fd(), libc::SO_SNDTIMEO, 100);
        let mut t = RangeTable::new();
        t.push(0, 8 * MIB);
        let e = send_memory(Link::Plain(a.as_raw_fd()), &ram, &t, None).unwrap_err();
        assert_eq!(
            (e.kind, e.errno),
            (Kind::Migration, Some(libc::EAGAIN)),
            "{}",
            e.message
        );
        assert!(e.message.contains("timed out"), "{}", e.message);
        // Nobody writes: SO_RCVTIMEO expires while the table is awaited.
        let (c, _d) = socketpair();
        set_timeout(c.as_raw_fd(), libc::SO_RCVTIMEO, 100);
        let e = recv_memory(Link::Plain(c.as_raw_fd()), &ram, 32).unwrap_err();
        assert_eq!(e.errno, Some(libc::EAGAIN), "{}", e.message);
        drop(b);
    }

    #[test]
    fn tune_socket_on_unix_and_tcp() {
        let (a, _b) = socketpair();
        tune_socket(a.as_raw_fd()).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        tune_socket(c.as_raw_fd()).unwrap();
        assert!(c.nodelay().unwrap());
        let mut val: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `val` and `len` are valid for getsockopt to write.
        unsafe {
            libc::getsockopt(
                a.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut val as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert!(val >= UNIX_SOCKET_BUFFER, "unix SO_SNDBUF {val}");
        assert!(tune_socket(0x7fff_0000).is_err());
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(
            tune_socket(f.as_raw_fd()).unwrap_err().errno,
            Some(libc::ENOTSOCK)
        );
    }
}
